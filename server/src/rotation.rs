//! Rotation of the server's signing keys: the X.509 CA and the JWT-SVID signing key.
//!
//! Every key is generated and held by the key manager (`[server.key_manager]`); this
//! module never sees private key material. Each kind of key goes through three states:
//!
//! - **prepared**: generated and published in the bundle, not signing yet;
//! - **active**: the one key that signs;
//! - **old**: replaced, still published until everything it signed has expired (an
//!   X.509 CA until its NotAfter, which caps every SVID it signed; a JWT key until
//!   `max_jwt_svid_ttl` plus a minute after it stopped signing).
//!
//! The schedule is SPIRE's ([`next_step`]): the next key is prepared (and published at
//! once) when less than half of the active key's lifetime remains, and activated when
//! less than a sixth remains. A prepared key is activated only after the bundle that
//! carries it has been stored in the datastore, so no agent or verifier sees a signature
//! before the key that made it.
//!
//! The state is kept in the [`Journal`], `<data_dir>/rotation.json` (0600, written to a
//! temporary file and renamed, see [`tessera_plugin_sdk::fs::write_private_file`]).
//! A key is journaled before it is published and published before it signs, so a
//! restart at any point resumes with the same keys: a key prepared before a crash is
//! reloaded from the key manager and activated later (SECURITY.md §3.10 item 97). With
//! the `memory` key manager nothing survives a restart, so the journal is not written.
//!
//! A key manager that is [unavailable](KeyManagerError::Unavailable) at rotation time
//! leaves the current keys in place; the rotation is retried on the next check with a
//! warning, and never falls back to a key held elsewhere (item 103).
//!
//! With an upstream authority (`[server.upstream_authority]`, [`UpstreamAuthority`])
//! every CA is an intermediate signed by it, the same schedule applies to them, and the
//! bundle publishes the upstream roots in place of the CA certificates. The upstream
//! files are read at start and again before each CA is prepared. A CA of the journal
//! records the upstream chain and roots it was signed under, so the roots stay
//! published while it does. When the configuration changed since the active CA was
//! made (an upstream added, removed or replaced), the start prepares a CA of the new
//! kind at once; it becomes active on the usual schedule.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tessera_plugin_keymanager::KeyManagerConfig;
use tessera_plugin_sdk::TrustDomain;
use tessera_plugin_sdk::jwt::JwtSigner;
use tessera_plugin_sdk::keymanager::{KeyManager, KeyManagerError, KeyType};
use tokio::sync::{Mutex, watch};

use crate::ca::upstream::UpstreamAuthority;
use crate::ca::{CaError, CertificateAuthority, UpstreamChain, X509Authority};
use crate::config::{ServerConfig, UpstreamAuthorityConfig};
use crate::datastore::{
    AuthorityContribution, Datastore, DatastoreError, StoredBundle, StoredJwtAuthority,
};
use crate::jwt_authority::JwtAuthority;
use crate::state::unix_seconds;

/// File name of the rotation journal in `data_dir`.
pub const JOURNAL_FILE: &str = "rotation.json";
/// Version of the journal format.
const JOURNAL_VERSION: u32 = 1;
/// Key ids of X.509 CA keys start with this.
pub const X509_KEY_PREFIX: &str = "x509-ca-";
/// Key ids of JWT signing keys start with this (followed by the `kid`).
pub const JWT_KEY_PREFIX: &str = "jwt-";
/// How long past `max_jwt_svid_ttl` a replaced JWT key stays published (verifier clock
/// leeway).
pub const JWT_RETIREMENT_LEEWAY: Duration = Duration::from_secs(60);
/// Longest wait between two checks of the schedule.
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest wait between two checks of the schedule.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// Longest time a prepared key must have been published before it may sign.
const MAX_PUBLICATION_DELAY: i64 = 60;

/// Why keys could not be loaded, rotated or published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    /// The key manager failed; [`KeyManagerError::is_unavailable`] says whether to
    /// retry.
    #[error("key manager: {0}")]
    KeyManager(#[from] KeyManagerError),
    /// A CA certificate could not be made or is unusable with its key.
    #[error("CA: {0}")]
    Ca(#[from] CaError),
    /// A JWT signer could not be made over its key.
    #[error("JWT key {kid}: {reason}")]
    Jwt {
        /// The key's kid.
        kid: String,
        /// What failed.
        reason: String,
    },
    /// Reading or writing the journal (or migrating old key files) failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The journal or an old key file cannot be used as it is.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A key the journal names is missing from the key manager.
    #[error(
        "key {key_id} ({what}) is in the rotation journal {} but not in the key manager; \
         restore the key directory from the same backup as the journal, or move the \
         journal aside to start a new CA (every agent then needs the new bundle)",
        journal.display()
    )]
    MissingKey {
        /// The key id.
        key_id: String,
        /// `X.509 CA` or `JWT`.
        what: &'static str,
        /// The journal.
        journal: PathBuf,
    },
    /// The datastore failed while publishing the bundle.
    #[error("datastore: {0}")]
    Datastore(#[from] DatastoreError),
    /// A blocking task did not complete.
    #[error("{0}")]
    Task(String),
}

impl RotationError {
    /// Whether the failure is transient (key manager or datastore unavailable): keep
    /// the current keys and retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            RotationError::KeyManager(err) => err.is_unavailable(),
            RotationError::Datastore(DatastoreError::Unavailable(_)) => true,
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The schedule.

/// What the schedule asks for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Idle,
    /// Generate the next key and publish it.
    Prepare,
    /// Make the prepared key the active one.
    Activate,
}

/// SPIRE's schedule for a key valid from `not_before` to `not_after` (Unix seconds):
/// prepare the next key when less than 1/2 of the lifetime remains, activate it when
/// less than 1/6 remains. A prepared key is activated only once it has been published
/// for `min(lifetime / 12, 60 s)` (`published_at`, `None` while it is not published
/// yet), unless the active key has expired, when waiting helps no one.
pub fn next_step(
    now: i64,
    not_before: i64,
    not_after: i64,
    prepared_published_at: Option<Option<i64>>,
) -> Step {
    let lifetime = not_after.saturating_sub(not_before).max(1);
    let remaining = not_after.saturating_sub(now);
    match prepared_published_at {
        None if remaining.saturating_mul(2) < lifetime => Step::Prepare,
        None => Step::Idle,
        Some(None) => Step::Idle,
        Some(Some(published_at)) => {
            let delay = (lifetime / 12).min(MAX_PUBLICATION_DELAY);
            if remaining <= 0
                || (remaining.saturating_mul(6) < lifetime && now >= published_at + delay)
            {
                Step::Activate
            } else {
                Step::Idle
            }
        }
    }
}

/// How often the rotation task checks the schedule: a 24th of the shorter key
/// lifetime, between 200 ms and 10 s.
pub fn check_interval(ca_ttl: Duration, jwt_key_ttl: Duration) -> Duration {
    (ca_ttl.min(jwt_key_ttl) / 24).clamp(MIN_CHECK_INTERVAL, MAX_CHECK_INTERVAL)
}

// ---------------------------------------------------------------------------------------
// The journal.

/// The state of a key in a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Published, not signing yet.
    Prepared,
    /// Signing.
    Active,
    /// Replaced; published until what it signed has expired.
    Old,
}

impl KeyState {
    /// `prepared`, `active` or `old`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Prepared => "prepared",
            KeyState::Active => "active",
            KeyState::Old => "old",
        }
    }
}

/// One X.509 CA in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509Record {
    /// The key manager's id of the CA key.
    pub key_id: String,
    /// Its state.
    pub state: KeyState,
    /// The CA certificate, PEM.
    pub certificate: String,
    /// Hex serial of the certificate.
    pub serial: String,
    /// NotBefore, Unix seconds.
    pub not_before: i64,
    /// NotAfter, Unix seconds: no SVID it signs outlives it; as `old` it is published
    /// until then.
    pub not_after: i64,
    /// When a bundle carrying it was first stored (Unix seconds).
    #[serde(default)]
    pub published_at: Option<i64>,
    /// When it started signing.
    #[serde(default)]
    pub activated_at: Option<i64>,
    /// Signed by an upstream authority: the certificates that follow it in every chain
    /// (the upstream CA and its intermediates, no root), PEM each. Absent for a
    /// self-signed CA.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream_chain: Vec<String>,
    /// Signed by an upstream authority: the roots its chain ends at, PEM each; the
    /// bundle publishes them in place of the certificate. Absent for a self-signed CA.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream_roots: Vec<String>,
}

impl X509Record {
    /// Whether an upstream authority signed it.
    pub fn is_upstream_signed(&self) -> bool {
        !self.upstream_roots.is_empty()
    }
}

/// One JWT signing key in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtRecord {
    /// The key manager's id of the key.
    pub key_id: String,
    /// The `kid` of its tokens.
    pub kid: String,
    /// Its state.
    pub state: KeyState,
    /// The public key (SPKI), PEM.
    pub public_key: String,
    /// When it was generated, Unix seconds.
    pub not_before: i64,
    /// End of its scheduled life (`not_before + jwt_key_ttl`), Unix seconds.
    pub not_after: i64,
    /// When a bundle carrying it was first stored.
    #[serde(default)]
    pub published_at: Option<i64>,
    /// When it started signing.
    #[serde(default)]
    pub activated_at: Option<i64>,
    /// `old` only: published until then (its last token's expiry plus leeway).
    #[serde(default)]
    pub expires_at: Option<i64>,
}

/// The rotation state of both kinds of keys (`rotation.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    /// Format version (1).
    pub version: u32,
    /// This server's instance id: its keys' contribution to the shared bundle is
    /// stored under it (`Datastore::publish_authorities`). Random, 32 hex characters;
    /// written on first start (journals of older servers get one then).
    #[serde(default)]
    pub server_id: String,
    /// X.509 CAs, newest first.
    pub x509: Vec<X509Record>,
    /// JWT keys, newest first.
    pub jwt: Vec<JwtRecord>,
}

impl Journal {
    fn x509_in(&self, state: KeyState) -> Option<&X509Record> {
        self.x509.iter().find(|r| r.state == state)
    }

    fn jwt_in(&self, state: KeyState) -> Option<&JwtRecord> {
        self.jwt.iter().find(|r| r.state == state)
    }

    /// Parses and checks a journal: version 1, exactly one active key of each kind, at
    /// most one prepared, valid key ids.
    pub fn parse(text: &[u8], path: &Path) -> Result<Self, RotationError> {
        let corrupt = |reason: String| RotationError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let journal: Journal =
            serde_json::from_slice(text).map_err(|err| corrupt(err.to_string()))?;
        if journal.version != JOURNAL_VERSION {
            return Err(corrupt(format!(
                "journal version {} is not supported (want {JOURNAL_VERSION})",
                journal.version
            )));
        }
        let count = |states: &mut dyn Iterator<Item = KeyState>, kind: &str| {
            let (mut active, mut prepared) = (0, 0);
            for state in states {
                match state {
                    KeyState::Active => active += 1,
                    KeyState::Prepared => prepared += 1,
                    KeyState::Old => {}
                }
            }
            if active != 1 || prepared > 1 {
                return Err(corrupt(format!(
                    "{kind}: {active} active and {prepared} prepared keys (want 1 and at most 1)"
                )));
            }
            Ok(())
        };
        count(&mut journal.x509.iter().map(|r| r.state), "x509")?;
        count(&mut journal.jwt.iter().map(|r| r.state), "jwt")?;
        for id in journal
            .x509
            .iter()
            .map(|r| &r.key_id)
            .chain(journal.jwt.iter().map(|r| &r.key_id))
        {
            tessera_plugin_sdk::keymanager::validate_key_id(id)
                .map_err(|err| corrupt(err.to_string()))?;
        }
        Ok(journal)
    }

    /// The journal as written: pretty JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Reads `<dir>/rotation.json`; `None` when there is none. Blocking.
    pub fn load(dir: &Path) -> Result<Option<Self>, RotationError> {
        let path = dir.join(JOURNAL_FILE);
        match tessera_plugin_sdk::fs::read_private_file(dir, JOURNAL_FILE) {
            Ok(text) => Self::parse(&text, &path).map(Some),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RotationError::Io { path, source }),
        }
    }

    /// Writes `<dir>/rotation.json` atomically (temporary file, fsync, rename), 0600.
    /// Blocking.
    pub fn save(&self, dir: &Path) -> Result<(), RotationError> {
        tessera_plugin_sdk::fs::write_private_file(dir, JOURNAL_FILE, &self.to_bytes()).map_err(
            |source| RotationError::Io {
                path: dir.join(JOURNAL_FILE),
                source,
            },
        )
    }
}

// ---------------------------------------------------------------------------------------
// What operators see.

/// One key as `authority show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityInfo {
    /// `x509` or `jwt`.
    pub kind: &'static str,
    /// Its state.
    pub state: KeyState,
    /// The key manager's key id.
    pub key_id: String,
    /// X.509: the certificate serial (hex); JWT: the `kid`.
    pub id: String,
    /// NotBefore (X.509) or creation time (JWT), Unix seconds.
    pub not_before: i64,
    /// NotAfter (X.509) or end of scheduled life (JWT), Unix seconds.
    pub not_after: i64,
    /// Old JWT keys: unpublished after this (Unix seconds); X.509: its NotAfter.
    pub published_until: Option<i64>,
    /// When it started signing, if it did.
    pub activated_at: Option<i64>,
    /// X.509: the certificate, DER.
    pub certificate_der: Vec<u8>,
}

// ---------------------------------------------------------------------------------------
// The rotation manager.

/// Rotation settings, from the server configuration.
#[derive(Debug, Clone)]
pub struct RotationConfig {
    /// The trust domain of the CAs.
    pub trust_domain: TrustDomain,
    /// Lifetime of each CA.
    pub ca_ttl: Duration,
    /// Lifetime of each JWT key.
    pub jwt_key_ttl: Duration,
    /// Longest JWT-SVID lifetime: how long an old JWT key stays published.
    pub max_jwt_svid_ttl: Duration,
    /// The key type of new keys.
    pub key_type: KeyType,
    /// Where the journal lives; `None` with the memory key manager (not persisted).
    pub journal_dir: Option<PathBuf>,
    /// `[server.upstream_authority]`: who signs the CAs (`None`: they are self-signed).
    pub upstream: Option<UpstreamAuthorityConfig>,
}

impl RotationConfig {
    /// The settings of `config`.
    pub fn from_server(config: &ServerConfig) -> Self {
        Self {
            trust_domain: config.trust_domain.clone(),
            ca_ttl: config.ca_ttl,
            jwt_key_ttl: config.jwt_key_ttl,
            max_jwt_svid_ttl: config.max_jwt_svid_ttl,
            key_type: KeyType::EcP256,
            journal_dir: match config.key_manager {
                KeyManagerConfig::Memory => None,
                KeyManagerConfig::Disk { .. } => Some(config.data_dir.clone()),
            },
            upstream: config.upstream_authority.clone(),
        }
    }
}

/// The mutable part, under one async lock (rotation steps are rare and short).
#[derive(Debug)]
struct Inner {
    journal: Journal,
    /// The prepared CA, loaded.
    x509_prepared: Option<Arc<CertificateAuthority>>,
    /// The prepared JWT key, loaded.
    jwt_prepared: Option<Arc<JwtSigner>>,
}

/// The key rotation of one server: owns the journal, the prepared keys and the switch
/// of the [`X509Authority`] and [`JwtAuthority`] that sign.
#[derive(Debug)]
pub struct Rotation {
    config: RotationConfig,
    key_manager: Arc<dyn KeyManager>,
    x509: Arc<X509Authority>,
    jwt: Arc<JwtAuthority>,
    inner: Mutex<Inner>,
    /// Serialises [`Rotation::publish`].
    publishing: Mutex<()>,
    /// Bumped after every activation (the server renews its own SVID then).
    activations: watch::Sender<u64>,
}

/// A JWT key of `stored` (this server's contribution as stored) that is still in force
/// at `now` and that `journal` never had: proof that another server writes under the
/// same id. JWT keys are checked, not CA certificates: every server mints its own kids,
/// whereas an upstream root legitimately outlives the journal records that named it.
/// A journal forgets a JWT key only after its published expiry, so no key of this
/// server's own can look foreign.
fn foreign_jwt_key(
    stored: &AuthorityContribution,
    journal: &Journal,
    now: SystemTime,
) -> Option<String> {
    stored
        .jwt_authorities
        .iter()
        .find(|key| {
            key.expires_at.is_none_or(|at| at > now)
                && !journal.jwt.iter().any(|r| r.kid == key.kid)
        })
        .map(|key| key.kid.clone())
}

/// Seconds since the epoch of `now`.
fn secs(now: SystemTime) -> i64 {
    unix_seconds(now)
}

fn random_hex(bytes: usize) -> Result<String, RotationError> {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf)
        .map_err(|_| RotationError::Task("the system RNG failed".into()))?;
    Ok(hex::encode(buf))
}

fn pem_der(text: &str, path: &Path) -> Result<Vec<u8>, RotationError> {
    pem::parse(text)
        .map(pem::Pem::into_contents)
        .map_err(|err| RotationError::Corrupt {
            path: path.to_owned(),
            reason: format!("bad PEM: {err}"),
        })
}

/// Reads and checks the configured upstream authority (`None` without one). With
/// `probe` (at start) it warns when the upstream ends before a new CA's lifetime would,
/// and a throwaway CA over a
/// throwaway key is signed by it and must pass the CA self-test (a probe SVID verified
/// by webpki up to the upstream roots), so that a chain that cannot work stops the
/// start even when the journal's CAs need no new signature.
async fn load_upstream(
    config: &RotationConfig,
    now: SystemTime,
    probe: bool,
) -> Result<Option<Arc<UpstreamAuthority>>, RotationError> {
    let Some(upstream_config) = config.upstream.clone() else {
        return Ok(None);
    };
    let upstream = Arc::new(
        blocking(
            move || Ok(UpstreamAuthority::load(&upstream_config, now).map_err(CaError::from)?),
        )
        .await?,
    );
    let intended =
        secs(now).saturating_add(i64::try_from(config.ca_ttl.as_secs()).unwrap_or(i64::MAX));
    // At start; at each prepare the new CA's own warning says it.
    if probe && upstream.not_after() < intended {
        tracing::warn!(
            upstream = upstream.subject(),
            upstream_not_after = upstream.not_after(),
            ca_ttl_secs = config.ca_ttl.as_secs(),
            "the upstream CA (or a certificate above it) expires before a new CA's lifetime \
             would end: new CAs are shortened to end with it; renew it"
        );
    }
    if probe {
        let key = tessera_plugin_keymanager::MemoryKeyManager::new()
            .generate_key("x509-ca-probe", KeyType::EcP256)
            .await?;
        let td = config.trust_domain.clone();
        // A throwaway CA only proves the upstream can sign: keep its life short, since
        // it is a real intermediate of the trust domain.
        let ttl = config.ca_ttl.min(Duration::from_secs(300));
        let checked = Arc::clone(&upstream);
        blocking(move || {
            CertificateAuthority::signed_by_upstream(key, &td, ttl, now, &checked)?;
            Ok(())
        })
        .await?;
    }
    Ok(Some(upstream))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RotationError> + Send + 'static,
) -> Result<T, RotationError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| RotationError::Task(format!("rotation task: {err}")))?
}

impl Rotation {
    /// Loads the journal and the keys it names, migrating the key files of an older
    /// server (`ca/ca_key.pem`, `ca/jwt_key.pem`) into the key manager on the first
    /// start, or creates the first CA and JWT key. `stored` is the bundle in the
    /// datastore (its replaced JWT keys are kept when migrating). Nothing here publishes:
    /// call [`Rotation::publish`] before anything signs.
    pub async fn open(
        config: RotationConfig,
        key_manager_config: &KeyManagerConfig,
        data_dir: &Path,
        stored: Option<&StoredBundle>,
        now: SystemTime,
    ) -> Result<Self, RotationError> {
        let mut migrated = None;
        if let (Some(dir), Some(key_dir)) = (
            config.journal_dir.clone(),
            key_manager_config.directory(data_dir),
        ) {
            let legacy_dir = data_dir.join("ca");
            migrated = blocking(move || legacy::migrate_files(&dir, &legacy_dir, &key_dir)).await?;
        }
        let key_manager = key_manager_config.build(data_dir).await?;
        Self::open_with(config, key_manager, migrated, stored, now).await
    }

    /// [`Rotation::open`] with a key manager built by the caller (tests).
    pub async fn open_with(
        config: RotationConfig,
        key_manager: Arc<dyn KeyManager>,
        migrated: Option<legacy::Migrated>,
        stored: Option<&StoredBundle>,
        now: SystemTime,
    ) -> Result<Self, RotationError> {
        let journal = match &config.journal_dir {
            Some(dir) => {
                let dir = dir.clone();
                blocking(move || Journal::load(&dir)).await?
            }
            None => None,
        };
        let journal_path = config
            .journal_dir
            .as_deref()
            .unwrap_or(Path::new("(memory)"))
            .join(JOURNAL_FILE);
        // A bad upstream authority stops the start, whatever the journal holds.
        let upstream = load_upstream(&config, now, true).await?;
        let (journal, fresh) = match (journal, migrated) {
            (Some(journal), _) => (journal, false),
            (None, Some(migrated)) => (
                migrated.into_journal(&config, stored, now, &journal_path)?,
                true,
            ),
            (None, None) => {
                let journal =
                    Self::first_keys(&config, key_manager.as_ref(), now, upstream.as_ref()).await?;
                (journal, true)
            }
        };

        let mut journal = journal;
        // A journal of an older server gets its id now, saved below with the rest.
        let new_server_id = journal.server_id.is_empty();
        if new_server_id {
            journal.server_id = random_hex(16)?;
        }
        for record in journal
            .jwt
            .iter_mut()
            .filter(|r| r.state != KeyState::Old && r.public_key.is_empty())
        {
            if let Some(key) = key_manager.get_key(&record.key_id).await? {
                record.public_key =
                    tessera_plugin_sdk::x509::pem_encode("PUBLIC KEY", key.public_key_der());
            }
        }

        // Load the keys that sign or will sign.
        let load_ca = |record: &X509Record| {
            let key_manager = Arc::clone(&key_manager);
            let record = record.clone();
            let td = config.trust_domain.clone();
            let path = journal_path.clone();
            async move {
                let key = key_manager.get_key(&record.key_id).await?.ok_or_else(|| {
                    RotationError::MissingKey {
                        key_id: record.key_id.clone(),
                        what: "X.509 CA",
                        journal: path.clone(),
                    }
                })?;
                let der = pem_der(&record.certificate, &path)?;
                let ca = if record.is_upstream_signed() {
                    let all = |pems: &[String]| {
                        pems.iter()
                            .map(|pem| pem_der(pem, &path))
                            .collect::<Result<Vec<_>, _>>()
                    };
                    let chain = UpstreamChain {
                        intermediates: all(&record.upstream_chain)?,
                        roots: all(&record.upstream_roots)?,
                    };
                    blocking(move || {
                        Ok(CertificateAuthority::from_upstream_certificate(
                            key, der, &td, chain,
                        )?)
                    })
                    .await?
                } else {
                    blocking(move || Ok(CertificateAuthority::from_certificate(key, der, &td)?))
                        .await?
                };
                Ok::<_, RotationError>(Arc::new(ca))
            }
        };
        let load_jwt = |record: &JwtRecord| {
            let key_manager = Arc::clone(&key_manager);
            let record = record.clone();
            let path = journal_path.clone();
            async move {
                let key = key_manager.get_key(&record.key_id).await?.ok_or_else(|| {
                    RotationError::MissingKey {
                        key_id: record.key_id.clone(),
                        what: "JWT",
                        journal: path.clone(),
                    }
                })?;
                if key.public_key_der() != pem_der(&record.public_key, &path)? {
                    return Err(RotationError::Corrupt {
                        path,
                        reason: format!(
                            "key {} in the key manager is not the JWT key {} of the journal",
                            record.key_id, record.kid
                        ),
                    });
                }
                let signer =
                    JwtSigner::from_signing_key(record.kid.clone(), key).map_err(|err| {
                        RotationError::Jwt {
                            kid: record.kid.clone(),
                            reason: err.to_string(),
                        }
                    })?;
                Ok::<_, RotationError>(Arc::new(signer))
            }
        };
        let active_x509 = journal
            .x509_in(KeyState::Active)
            .ok_or_else(|| RotationError::Task("no active CA".into()))?;
        let active_ca = load_ca(active_x509).await?;
        let x509_prepared = match journal.x509_in(KeyState::Prepared) {
            Some(record) => Some(load_ca(record).await?),
            None => None,
        };
        let active_jwt = journal
            .jwt_in(KeyState::Active)
            .ok_or_else(|| RotationError::Task("no active JWT key".into()))?;
        let active_signer = load_jwt(active_jwt).await?;
        let jwt_prepared = match journal.jwt_in(KeyState::Prepared) {
            Some(record) => Some(load_jwt(record).await?),
            None => None,
        };
        tracing::info!(
            key_manager = key_manager.name(),
            upstream = upstream.as_ref().map(|u| u.subject().to_owned()),
            ca_serial = active_ca.serial_hex(),
            ca_not_after = active_x509.not_after,
            ca_prepared = x509_prepared.as_ref().map(|c| c.serial_hex().to_owned()),
            jwt_kid = active_signer.kid(),
            jwt_prepared = jwt_prepared.as_ref().map(|s| s.kid().to_owned()),
            "signing keys loaded"
        );

        let rotation = Self {
            x509: Arc::new(X509Authority::new(active_ca)),
            jwt: Arc::new(JwtAuthority::new(active_signer)),
            config,
            key_manager,
            inner: Mutex::new(Inner {
                journal,
                x509_prepared,
                jwt_prepared,
            }),
            publishing: Mutex::new(()),
            activations: watch::channel(0).0,
        };
        if fresh || new_server_id {
            let inner = rotation.inner.lock().await;
            rotation.save(&inner.journal).await?;
            drop(inner);
        }
        if fresh && let Some(dir) = &rotation.config.journal_dir {
            let legacy_dir = dir.join("ca");
            blocking(move || {
                legacy::remove_migrated(&legacy_dir);
                Ok(())
            })
            .await?;
        }
        rotation
            .follow_upstream_change(now, upstream.as_ref())
            .await?;
        // The upstream key is not kept between rotations: it is read again when the next
        // CA is prepared.
        drop(upstream);
        rotation.recover_expired_ca(now).await?;
        rotation.remove_unused_keys().await;
        Ok(rotation)
    }

    /// The configured signer of CAs changed since the journal's CAs were made (an
    /// upstream authority added, removed, or another upstream key): a prepared CA of
    /// the old kind is dropped (it never signed), and if the active CA is of the old
    /// kind a CA of the new kind is prepared now. It is published before the server
    /// serves and becomes active on the usual schedule (with less than 1/6 of the active
    /// CA's life left, after being published for at least `min(lifetime / 12, 60 s)`),
    /// so agents hold the new roots before any SVID chains to them. The old CA stays in
    /// the bundle until it expires.
    async fn follow_upstream_change(
        &self,
        now: SystemTime,
        upstream: Option<&Arc<UpstreamAuthority>>,
    ) -> Result<(), RotationError> {
        let mut inner = self.inner.lock().await;
        let as_configured = |r: &X509Record| match upstream {
            None => !r.is_upstream_signed(),
            Some(u) => {
                r.is_upstream_signed()
                    && pem::parse(&r.certificate).is_ok_and(|p| u.signed(p.contents()))
            }
        };
        let active_ok = inner
            .journal
            .x509_in(KeyState::Active)
            .is_none_or(as_configured);
        let stale_prepared = inner
            .journal
            .x509_in(KeyState::Prepared)
            .filter(|r| !as_configured(r))
            .cloned();
        if let Some(stale) = stale_prepared {
            let before = inner.journal.clone();
            inner.journal.x509.retain(|r| r.key_id != stale.key_id);
            if let Err(err) = self.save(&inner.journal).await {
                inner.journal = before;
                return Err(err);
            }
            inner.x509_prepared = None;
            tracing::info!(
                serial = stale.serial,
                "dropped the prepared CA: it was not signed as the configuration now says \
                 (upstream authority changed); it never signed anything"
            );
            self.forget_key(&stale.key_id).await;
        }
        if active_ok {
            return Ok(());
        }
        let (ca, record) = Self::new_ca(
            &self.config,
            self.key_manager.as_ref(),
            now,
            KeyState::Prepared,
            upstream,
        )
        .await?;
        let key_id = record.key_id.clone();
        inner.journal.x509.insert(0, record);
        if let Err(err) = self.save(&inner.journal).await {
            inner.journal.x509.retain(|r| r.key_id != key_id);
            let _ = self.key_manager.delete_key(&key_id).await;
            return Err(err);
        }
        tracing::warn!(
            serial = ca.serial_hex(),
            upstream = upstream.map(|u| u.subject().to_owned()),
            "the active CA is not signed as the configuration now says (upstream authority \
             added, removed or replaced): prepared a new CA and publishing it; it becomes \
             active on the usual rotation schedule, and the old CA stays in the bundle until \
             it expires"
        );
        inner.x509_prepared = Some(ca);
        Ok(())
    }

    /// After a long downtime the active CA may have expired: nothing can sign with it,
    /// so the prepared CA (or a new one) becomes active at once. It is published before
    /// the server serves anything; agents whose SVIDs have expired too must attest again.
    async fn recover_expired_ca(&self, now: SystemTime) -> Result<(), RotationError> {
        for _ in 0..2 {
            {
                let mut inner = self.inner.lock().await;
                let expired = inner
                    .journal
                    .x509_in(KeyState::Active)
                    .is_some_and(|r| r.not_after <= secs(now));
                if !expired {
                    return Ok(());
                }
                for r in &mut inner.journal.x509 {
                    if r.state == KeyState::Prepared {
                        // Published below, before the server serves.
                        r.published_at.get_or_insert(secs(now));
                    }
                }
            }
            tracing::error!(
                "the active CA has expired (the server was down too long); \
                 switching to the next CA now"
            );
            self.step_x509(now).await?;
        }
        Ok(())
    }

    /// A journal with a new CA and JWT key, both active at once (first start: nothing
    /// was published before, and nothing is signed before the first publication).
    async fn first_keys(
        config: &RotationConfig,
        key_manager: &dyn KeyManager,
        now: SystemTime,
        upstream: Option<&Arc<UpstreamAuthority>>,
    ) -> Result<Journal, RotationError> {
        let (ca, ca_record) =
            Self::new_ca(config, key_manager, now, KeyState::Active, upstream).await?;
        let (_, jwt_record) = Self::new_jwt(config, key_manager, now, KeyState::Active).await?;
        tracing::info!(
            trust_domain = config.trust_domain.name(),
            serial = ca.serial_hex(),
            kid = jwt_record.kid,
            "created the first CA and JWT signing key"
        );
        Ok(Journal {
            version: JOURNAL_VERSION,
            server_id: random_hex(16)?,
            x509: vec![X509Record {
                activated_at: Some(secs(now)),
                ..ca_record
            }],
            jwt: vec![JwtRecord {
                activated_at: Some(secs(now)),
                ..jwt_record
            }],
        })
    }

    /// Generates a CA key in the key manager and its certificate: self-signed, or
    /// signed by `upstream` (only the public key goes to it).
    async fn new_ca(
        config: &RotationConfig,
        key_manager: &dyn KeyManager,
        now: SystemTime,
        state: KeyState,
        upstream: Option<&Arc<UpstreamAuthority>>,
    ) -> Result<(Arc<CertificateAuthority>, X509Record), RotationError> {
        let key_id = format!("{X509_KEY_PREFIX}{}", random_hex(8)?);
        let key = key_manager.generate_key(&key_id, config.key_type).await?;
        let td = config.trust_domain.clone();
        let ttl = config.ca_ttl;
        let made = match upstream {
            None => {
                blocking(move || Ok(CertificateAuthority::self_signed(key, &td, ttl, now)?)).await
            }
            Some(upstream) => {
                let upstream = Arc::clone(upstream);
                blocking(move || {
                    Ok(CertificateAuthority::signed_by_upstream(
                        key, &td, ttl, now, &upstream,
                    )?)
                })
                .await
            }
        };
        let ca = match made {
            Ok(ca) => Arc::new(ca),
            Err(err) => {
                let _ = key_manager.delete_key(&key_id).await;
                return Err(err);
            }
        };
        let pems = |ders: &[Vec<u8>]| {
            ders.iter()
                .map(|der| tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", der))
                .collect::<Vec<_>>()
        };
        let (upstream_chain, upstream_roots) = ca
            .upstream()
            .map(|u| (pems(&u.intermediates), pems(&u.roots)))
            .unwrap_or_default();
        let intended = secs(now).saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        if let Some(upstream) = upstream
            && secs(ca.not_after()) < intended
        {
            tracing::warn!(
                serial = ca.serial_hex(),
                not_after = secs(ca.not_after()),
                upstream = upstream.subject(),
                upstream_not_after = upstream.not_after(),
                "the new CA ends early, with the upstream CA: renew the upstream CA \
                 (cert_file_path); until then CAs rotate sooner and SVIDs are shorter"
            );
        }
        let record = X509Record {
            key_id,
            state,
            certificate: ca.certificate_pem(),
            serial: ca.serial_hex().to_owned(),
            not_before: secs(ca.not_before()),
            not_after: secs(ca.not_after()),
            published_at: None,
            activated_at: None,
            upstream_chain,
            upstream_roots,
        };
        Ok((ca, record))
    }

    /// Generates a JWT key in the key manager.
    async fn new_jwt(
        config: &RotationConfig,
        key_manager: &dyn KeyManager,
        now: SystemTime,
        state: KeyState,
    ) -> Result<(Arc<JwtSigner>, JwtRecord), RotationError> {
        let kid = random_hex(16)?;
        let key_id = format!("{JWT_KEY_PREFIX}{kid}");
        let key = key_manager.generate_key(&key_id, config.key_type).await?;
        let public = tessera_plugin_sdk::x509::pem_encode("PUBLIC KEY", key.public_key_der());
        let signer =
            JwtSigner::from_signing_key(kid.clone(), key).map_err(|err| RotationError::Jwt {
                kid: kid.clone(),
                reason: err.to_string(),
            })?;
        let not_before = secs(now);
        let ttl = i64::try_from(config.jwt_key_ttl.as_secs()).unwrap_or(i64::MAX);
        let record = JwtRecord {
            key_id,
            kid,
            state,
            public_key: public,
            not_before,
            not_after: not_before.saturating_add(ttl),
            published_at: None,
            activated_at: None,
            expires_at: None,
        };
        Ok((Arc::new(signer), record))
    }

    async fn save(&self, journal: &Journal) -> Result<(), RotationError> {
        let Some(dir) = self.config.journal_dir.clone() else {
            return Ok(());
        };
        let journal = journal.clone();
        blocking(move || journal.save(&dir)).await
    }

    /// Deletes the keys of our prefixes that the journal no longer needs (old keys, keys
    /// of a rotation step a crash interrupted before it was journaled). Best effort.
    async fn remove_unused_keys(&self) {
        let needed: BTreeSet<String> = {
            let inner = self.inner.lock().await;
            inner
                .journal
                .x509
                .iter()
                .filter(|r| r.state != KeyState::Old)
                .map(|r| r.key_id.clone())
                .chain(
                    inner
                        .journal
                        .jwt
                        .iter()
                        .filter(|r| r.state != KeyState::Old)
                        .map(|r| r.key_id.clone()),
                )
                .collect()
        };
        let keys = match self.key_manager.list_keys().await {
            Ok(keys) => keys,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list the key manager's keys");
                return;
            }
        };
        for key in keys {
            let id = key.id();
            let ours = id.starts_with(X509_KEY_PREFIX) || id.starts_with(JWT_KEY_PREFIX);
            if ours && !needed.contains(id) {
                match self.key_manager.delete_key(id).await {
                    Ok(_) => tracing::info!(key_id = id, "deleted a key no longer needed"),
                    Err(err) => {
                        tracing::warn!(key_id = id, error = %err, "cannot delete an unused key")
                    }
                }
            }
        }
    }

    /// The X.509 authority that signs (switched on activation).
    pub fn x509(&self) -> &Arc<X509Authority> {
        &self.x509
    }

    /// The JWT authority that signs (switched on activation).
    pub fn jwt(&self) -> &Arc<JwtAuthority> {
        &self.jwt
    }

    /// The key manager in use.
    pub fn key_manager(&self) -> &Arc<dyn KeyManager> {
        &self.key_manager
    }

    /// Changes after every activation.
    pub fn activations(&self) -> watch::Receiver<u64> {
        self.activations.subscribe()
    }

    /// How often [`Rotation::tick`] should run.
    pub fn check_interval(&self) -> Duration {
        check_interval(self.config.ca_ttl, self.config.jwt_key_ttl)
    }

    /// A copy of the journal.
    pub async fn journal(&self) -> Journal {
        self.inner.lock().await.journal.clone()
    }

    /// Every key with its state, X.509 first, newest first.
    pub async fn authorities(&self) -> Vec<AuthorityInfo> {
        let journal = self.journal().await;
        let mut out = Vec::new();
        for r in &journal.x509 {
            out.push(AuthorityInfo {
                kind: "x509",
                state: r.state,
                key_id: r.key_id.clone(),
                id: r.serial.clone(),
                not_before: r.not_before,
                not_after: r.not_after,
                published_until: Some(r.not_after),
                activated_at: r.activated_at,
                certificate_der: pem::parse(&r.certificate)
                    .map(pem::Pem::into_contents)
                    .unwrap_or_default(),
            });
        }
        for r in &journal.jwt {
            out.push(AuthorityInfo {
                kind: "jwt",
                state: r.state,
                key_id: r.key_id.clone(),
                id: r.kid.clone(),
                not_before: r.not_before,
                not_after: r.not_after,
                published_until: r.expires_at,
                activated_at: r.activated_at,
                certificate_der: Vec::new(),
            });
        }
        out
    }

    /// What the bundle publishes now: the CA certificates (active, prepared, old; for a
    /// CA signed by an upstream authority, the upstream roots instead, each once) and
    /// the JWT keys (active and prepared without expiry, old with theirs).
    pub async fn bundle_content(
        &self,
    ) -> Result<(Vec<Vec<u8>>, Vec<StoredJwtAuthority>), RotationError> {
        Self::content_of(&self.journal().await)
    }

    /// [`Rotation::bundle_content`] of one journal.
    fn content_of(
        journal: &Journal,
    ) -> Result<(Vec<Vec<u8>>, Vec<StoredJwtAuthority>), RotationError> {
        let path = Path::new(JOURNAL_FILE);
        let order = [KeyState::Active, KeyState::Prepared, KeyState::Old];
        let mut x509 = Vec::new();
        let mut jwt = Vec::new();
        for state in order {
            for r in journal.x509.iter().filter(|r| r.state == state) {
                let anchors = if r.is_upstream_signed() {
                    r.upstream_roots
                        .iter()
                        .map(|pem| pem_der(pem, path))
                        .collect::<Result<Vec<_>, _>>()?
                } else {
                    vec![pem_der(&r.certificate, path)?]
                };
                for der in anchors {
                    if !x509.contains(&der) {
                        x509.push(der);
                    }
                }
            }
            for r in journal.jwt.iter().filter(|r| r.state == state) {
                jwt.push(StoredJwtAuthority {
                    kid: r.kid.clone(),
                    public_key: pem_der(&r.public_key, path)?,
                    expires_at: r.expires_at.and_then(|at| {
                        u64::try_from(at)
                            .ok()
                            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
                    }),
                });
            }
        }
        Ok((x509, jwt))
    }

    /// Stores this server's keys as its contribution to the trust domain's bundle
    /// (`Datastore::publish_authorities`, which merges the contributions of every server
    /// sharing the datastore and bumps the sequence number when the bundle changes);
    /// then marks the keys it carried as published (which lets a prepared key become
    /// active later). Returns whether the stored bundle changed (the caller wakes `Sync`
    /// streams).
    ///
    /// Publications are serialised, and only the keys of the snapshot that was stored
    /// are marked: a key prepared meanwhile waits for the next publication.
    ///
    /// Before storing, it checks that no other server publishes under this server's id
    /// (a copied data directory): a contribution stored under the id that carries a JWT
    /// key still in force that this journal never had means another server wrote it.
    /// The server then takes a new id, so that neither removes the other's keys.
    pub async fn publish(
        &self,
        datastore: &dyn Datastore,
        now: SystemTime,
    ) -> Result<bool, RotationError> {
        let _one_at_a_time = self.publishing.lock().await;
        let td = self.config.trust_domain.name();
        let journal = self.journal().await;
        let (x509_authorities, jwt_authorities) = Self::content_of(&journal)?;
        let mut server_id = journal.server_id.clone();
        let stored_mine = datastore
            .list_contributions(td)
            .await?
            .into_iter()
            .find(|c| c.server_id == server_id);
        if let Some(kid) = stored_mine
            .as_ref()
            .and_then(|row| foreign_jwt_key(row, &journal, now))
        {
            let new_id = random_hex(16)?;
            tracing::error!(
                server_id,
                new_server_id = new_id,
                foreign_kid = kid,
                "another server publishes its keys under this server's id (a copied data \
                 directory?); taking a new id so that neither removes the other's keys"
            );
            let mut inner = self.inner.lock().await;
            inner.journal.server_id.clone_from(&new_id);
            self.save(&inner.journal).await?;
            server_id = new_id;
        }
        let last_not_after = journal
            .x509
            .iter()
            .map(|r| r.not_after)
            .chain(journal.jwt.iter().map(|r| r.not_after))
            .chain(journal.jwt.iter().filter_map(|r| r.expires_at))
            .max()
            .unwrap_or(0);
        let expires_at = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(last_not_after).unwrap_or(0));
        let contribution = AuthorityContribution {
            trust_domain: td.to_owned(),
            server_id,
            x509_authorities,
            jwt_authorities,
            expires_at,
        };
        let changed = datastore.publish_authorities(contribution, now).await?;
        if changed {
            let published = datastore.get_bundle(td).await?;
            tracing::info!(
                sequence_number = published.as_ref().map(|b| b.sequence_number),
                x509_authorities = published.as_ref().map(|b| b.x509_authorities.len()),
                jwt_authorities = published.as_ref().map(|b| b.jwt_authorities.len()),
                "trust bundle published"
            );
        }
        let stored_ids: BTreeSet<&str> = journal
            .x509
            .iter()
            .map(|r| r.key_id.as_str())
            .chain(journal.jwt.iter().map(|r| r.key_id.as_str()))
            .collect();
        let mut inner = self.inner.lock().await;
        let mut marked = false;
        let now = secs(now);
        let journal = &mut inner.journal;
        for published_at in journal
            .x509
            .iter_mut()
            .filter(|r| stored_ids.contains(r.key_id.as_str()))
            .map(|r| &mut r.published_at)
            .chain(
                journal
                    .jwt
                    .iter_mut()
                    .filter(|r| stored_ids.contains(r.key_id.as_str()))
                    .map(|r| &mut r.published_at),
            )
        {
            if published_at.is_none() {
                *published_at = Some(now);
                marked = true;
            }
        }
        if marked {
            // Not fatal: unsaved, the time is set again after a restart's publication.
            if let Err(err) = self.save(journal).await {
                tracing::warn!(error = %err, "cannot record the publication in the rotation journal");
            }
        }
        Ok(changed)
    }

    /// One check of the schedule for both kinds of keys: prepares, activates and drops
    /// keys as due, journaling each step before it takes effect. Returns whether the
    /// keys to publish changed (then call [`Rotation::publish`]). A key manager that is
    /// unavailable leaves the current keys in place and returns the error; call again
    /// later.
    pub async fn tick(&self, now: SystemTime) -> Result<bool, RotationError> {
        let mut changed = self.drop_expired(now).await?;
        changed |= self.step_x509(now).await?;
        changed |= self.step_jwt(now, false).await?;
        Ok(changed)
    }

    /// Removes old keys whose signatures have all expired.
    async fn drop_expired(&self, now: SystemTime) -> Result<bool, RotationError> {
        let now = secs(now);
        let mut inner = self.inner.lock().await;
        let before = inner.journal.clone();
        inner
            .journal
            .x509
            .retain(|r| r.state != KeyState::Old || r.not_after > now);
        inner
            .journal
            .jwt
            .retain(|r| r.state != KeyState::Old || r.expires_at.is_some_and(|at| at > now));
        if inner.journal == before {
            return Ok(false);
        }
        if let Err(err) = self.save(&inner.journal).await {
            inner.journal = before;
            return Err(err);
        }
        tracing::info!("expired authorities removed from the bundle");
        Ok(true)
    }

    async fn step_x509(&self, now: SystemTime) -> Result<bool, RotationError> {
        let mut inner = self.inner.lock().await;
        let Some(active) = inner.journal.x509_in(KeyState::Active).cloned() else {
            return Ok(false);
        };
        let prepared = inner
            .journal
            .x509_in(KeyState::Prepared)
            .map(|r| r.published_at);
        // The schedule runs from when the CA was made, not from its back-dated NotBefore.
        let backdate = i64::try_from(crate::ca::BACKDATE.as_secs()).unwrap_or(0);
        let start = active
            .not_before
            .saturating_add(backdate)
            .min(active.not_after);
        match next_step(secs(now), start, active.not_after, prepared) {
            Step::Idle => Ok(false),
            Step::Prepare => {
                // The upstream files are read again: a renewed upstream CA is used from
                // the next CA on.
                let upstream = match load_upstream(&self.config, now, false).await {
                    Ok(upstream) => upstream,
                    Err(err) => {
                        self.warn_stuck("X.509 CA", start, active.not_after, now, &err);
                        return Err(err);
                    }
                };
                let (ca, record) = match Self::new_ca(
                    &self.config,
                    self.key_manager.as_ref(),
                    now,
                    KeyState::Prepared,
                    upstream.as_ref(),
                )
                .await
                {
                    Ok(made) => made,
                    Err(err) => {
                        self.warn_stuck("X.509 CA", start, active.not_after, now, &err);
                        return Err(err);
                    }
                };
                let key_id = record.key_id.clone();
                inner.journal.x509.insert(0, record);
                if let Err(err) = self.save(&inner.journal).await {
                    inner.journal.x509.retain(|r| r.key_id != key_id);
                    let _ = self.key_manager.delete_key(&key_id).await;
                    return Err(err);
                }
                tracing::info!(
                    serial = ca.serial_hex(),
                    key_id,
                    not_after = secs(ca.not_after()),
                    "prepared the next CA; publishing it"
                );
                inner.x509_prepared = Some(ca);
                Ok(true)
            }
            Step::Activate => {
                let Some(next) = inner.x509_prepared.clone() else {
                    return Ok(false);
                };
                let before = inner.journal.clone();
                let now_s = secs(now);
                for r in &mut inner.journal.x509 {
                    match r.state {
                        KeyState::Active => r.state = KeyState::Old,
                        KeyState::Prepared => {
                            r.state = KeyState::Active;
                            r.activated_at = Some(now_s);
                        }
                        KeyState::Old => {}
                    }
                }
                if let Err(err) = self.save(&inner.journal).await {
                    inner.journal = before;
                    return Err(err);
                }
                inner.x509_prepared = None;
                let old = self.x509.activate(Arc::clone(&next));
                drop(inner);
                tracing::info!(
                    serial = next.serial_hex(),
                    old_serial = old.serial_hex(),
                    old_not_after = secs(old.not_after()),
                    "activated the next CA; the old one stays in the bundle until it expires"
                );
                self.forget_key(old.key_id()).await;
                self.activations.send_modify(|n| *n += 1);
                Ok(true)
            }
        }
    }

    /// One step of the JWT key schedule; `force` prepares now (`authority
    /// rotate-jwt-key`) and activates as soon as the prepared key is published.
    async fn step_jwt(&self, now: SystemTime, force: bool) -> Result<bool, RotationError> {
        let mut inner = self.inner.lock().await;
        let Some(active) = inner.journal.jwt_in(KeyState::Active).cloned() else {
            return Ok(false);
        };
        let prepared = inner
            .journal
            .jwt_in(KeyState::Prepared)
            .map(|r| r.published_at);
        let step = match (force, prepared) {
            (true, None) => Step::Prepare,
            (true, Some(Some(_))) => Step::Activate,
            (true, Some(None)) => Step::Idle,
            (false, prepared) => {
                next_step(secs(now), active.not_before, active.not_after, prepared)
            }
        };
        match step {
            Step::Idle => Ok(false),
            Step::Prepare => {
                let (signer, record) = match Self::new_jwt(
                    &self.config,
                    self.key_manager.as_ref(),
                    now,
                    KeyState::Prepared,
                )
                .await
                {
                    Ok(made) => made,
                    Err(err) => {
                        self.warn_stuck("JWT", active.not_before, active.not_after, now, &err);
                        return Err(err);
                    }
                };
                let key_id = record.key_id.clone();
                inner.journal.jwt.insert(0, record);
                if let Err(err) = self.save(&inner.journal).await {
                    inner.journal.jwt.retain(|r| r.key_id != key_id);
                    let _ = self.key_manager.delete_key(&key_id).await;
                    return Err(err);
                }
                tracing::info!(
                    kid = signer.kid(),
                    "prepared the next JWT signing key; publishing it"
                );
                inner.jwt_prepared = Some(signer);
                Ok(true)
            }
            Step::Activate => {
                let Some(next) = inner.jwt_prepared.clone() else {
                    return Ok(false);
                };
                let before = inner.journal.clone();
                let now_s = secs(now);
                let keep =
                    i64::try_from((self.config.max_jwt_svid_ttl + JWT_RETIREMENT_LEEWAY).as_secs())
                        .unwrap_or(i64::MAX);
                let mut old_key_id = String::new();
                for r in &mut inner.journal.jwt {
                    match r.state {
                        KeyState::Active => {
                            old_key_id = r.key_id.clone();
                            r.state = KeyState::Old;
                            r.expires_at = Some(now_s.saturating_add(keep));
                        }
                        KeyState::Prepared => {
                            r.state = KeyState::Active;
                            r.activated_at = Some(now_s);
                        }
                        KeyState::Old => {}
                    }
                }
                if let Err(err) = self.save(&inner.journal).await {
                    inner.journal = before;
                    return Err(err);
                }
                inner.jwt_prepared = None;
                let old = self.jwt.activate(Arc::clone(&next));
                drop(inner);
                tracing::info!(
                    kid = next.kid(),
                    old_kid = old.kid(),
                    "activated the next JWT signing key; the old one stays in the bundle until its tokens expire"
                );
                self.forget_key(&old_key_id).await;
                self.activations.send_modify(|n| *n += 1);
                Ok(true)
            }
        }
    }

    /// Prepares a new JWT key now if none is prepared (`authority rotate-jwt-key`);
    /// publish it, wait, then call [`Rotation::activate_jwt_now`].
    pub async fn prepare_jwt_now(&self, now: SystemTime) -> Result<bool, RotationError> {
        self.step_jwt(now, true).await
    }

    /// Activates the prepared JWT key if it has been published; returns the active kid.
    pub async fn activate_jwt_now(&self, now: SystemTime) -> Result<String, RotationError> {
        self.step_jwt(now, true).await?;
        Ok(self.jwt.current().kid().to_owned())
    }

    /// Deletes a replaced key from the key manager: an old key only needs its public
    /// half, which the journal keeps.
    async fn forget_key(&self, key_id: &str) {
        if let Err(err) = self.key_manager.delete_key(key_id).await {
            tracing::warn!(key_id, error = %err, "cannot delete a replaced key; it is retried at the next start");
        }
    }

    fn warn_stuck(
        &self,
        what: &str,
        not_before: i64,
        not_after: i64,
        now: SystemTime,
        err: &RotationError,
    ) {
        let now = secs(now);
        let lifetime = (not_after - not_before).max(1);
        let remaining = not_after - now;
        if remaining.saturating_mul(6) < lifetime {
            tracing::error!(
                key = what,
                remaining_secs = remaining,
                error = %err,
                "cannot prepare the next signing key and the active one is near its end; \
                 keeping it and retrying"
            );
        } else {
            tracing::warn!(
                key = what,
                remaining_secs = remaining,
                error = %err,
                "cannot prepare the next signing key; keeping the active one and retrying"
            );
        }
    }
}

/// Migration of the key files of servers before the key manager: `ca/ca_key.pem` and
/// `ca/ca_cert.pem`, `ca/jwt_key.pem` (a `kid:` line and a PKCS#8 PEM).
pub mod legacy {
    use std::path::Path;

    use super::{
        JOURNAL_FILE, JOURNAL_VERSION, JWT_KEY_PREFIX, Journal, JwtRecord, KeyState,
        RotationConfig, RotationError, X509_KEY_PREFIX, X509Record, secs,
    };
    use crate::ca::{
        CA_CERT_FILE, CA_KEY_FILE, pem_decode_single_certificate, serial_of_certificate,
    };
    use crate::datastore::StoredBundle;
    use std::time::SystemTime;

    /// The old JWT key file.
    pub const JWT_KEY_FILE: &str = "jwt_key.pem";

    /// What was moved into the key directory.
    #[derive(Debug)]
    pub struct Migrated {
        ca_key_id: String,
        ca_certificate: Vec<u8>,
        jwt: Option<(String, String)>,
    }

    /// With no journal yet and old key files present: writes each key, as PKCS#8 DER,
    /// into the key directory (`<id>.key`, 0600, atomically), where the disk key manager
    /// loads it. The old files are removed once the journal is saved. Blocking.
    pub fn migrate_files(
        journal_dir: &Path,
        legacy_dir: &Path,
        key_dir: &Path,
    ) -> Result<Option<Migrated>, RotationError> {
        if journal_dir.join(JOURNAL_FILE).exists() {
            if legacy_dir.join(CA_KEY_FILE).exists() {
                tracing::warn!(
                    path = %legacy_dir.join(CA_KEY_FILE).display(),
                    "an old CA key file is still present but the rotation journal is in use; \
                     it is ignored (remove it once backups no longer need it)"
                );
            }
            return Ok(None);
        }
        if !legacy_dir.join(CA_KEY_FILE).exists() {
            return Ok(None);
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| RotationError::Io { path, source }
        };
        let corrupt = |path: &Path, reason: String| RotationError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let key_path = legacy_dir.join(CA_KEY_FILE);
        let key_pem = tessera_plugin_sdk::fs::read_private_file(legacy_dir, CA_KEY_FILE)
            .map_err(io(&key_path))?;
        let key_der = pem::parse(&key_pem)
            .map_err(|err| corrupt(&key_path, format!("bad PEM: {err}")))?
            .into_contents();
        let cert_path = legacy_dir.join(CA_CERT_FILE);
        let cert_pem = std::fs::read(&cert_path).map_err(io(&cert_path))?;
        let cert_der = pem_decode_single_certificate(&cert_pem)
            .map_err(|err| corrupt(&cert_path, err.to_string()))?;
        let serial =
            serial_of_certificate(&cert_der).map_err(|err| corrupt(&cert_path, err.to_string()))?;
        let ca_key_id = format!("{X509_KEY_PREFIX}{}", &serial[..serial.len().min(16)]);

        let jwt_path = legacy_dir.join(JWT_KEY_FILE);
        let jwt = match tessera_plugin_sdk::fs::read_private_file(legacy_dir, JWT_KEY_FILE) {
            Ok(contents) => {
                let text = String::from_utf8(contents)
                    .map_err(|_| corrupt(&jwt_path, "not UTF-8".into()))?;
                let (first, pem_text) = text
                    .split_once('\n')
                    .ok_or_else(|| corrupt(&jwt_path, "no kid line".into()))?;
                let kid = first
                    .strip_prefix("kid: ")
                    .ok_or_else(|| corrupt(&jwt_path, "no kid line".into()))?;
                let der = pem::parse(pem_text)
                    .map_err(|err| corrupt(&jwt_path, format!("bad PEM: {err}")))?
                    .into_contents();
                let key_id = format!("{JWT_KEY_PREFIX}{kid}");
                tessera_plugin_sdk::keymanager::validate_key_id(&key_id)
                    .map_err(|err| corrupt(&jwt_path, err.to_string()))?;
                Some((key_id, kid.to_owned(), der))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(RotationError::Io {
                    path: jwt_path,
                    source,
                });
            }
        };

        tessera_plugin_sdk::fs::ensure_private_dir(key_dir).map_err(io(key_dir))?;
        let write = |id: &str, der: &[u8]| {
            let name = format!("{id}.key");
            tessera_plugin_sdk::fs::write_private_file(key_dir, &name, der)
                .map_err(io(&key_dir.join(&name)))
        };
        write(&ca_key_id, &key_der)?;
        if let Some((id, _, der)) = &jwt {
            write(id, der)?;
        }
        tracing::info!(
            from = %legacy_dir.display(),
            to = %key_dir.display(),
            "migrating the CA and JWT keys into the key manager"
        );
        Ok(Some(Migrated {
            ca_key_id,
            ca_certificate: cert_der,
            jwt: jwt.map(|(id, kid, _)| (id, kid)),
        }))
    }

    impl Migrated {
        /// The journal of the migrated keys, both active. The replaced JWT keys of the
        /// stored bundle stay published (until their expiry).
        pub(super) fn into_journal(
            self,
            config: &RotationConfig,
            stored: Option<&StoredBundle>,
            now: SystemTime,
            path: &Path,
        ) -> Result<Journal, RotationError> {
            let cert = x509_parser::parse_x509_certificate(&self.ca_certificate)
                .map_err(|err| RotationError::Corrupt {
                    path: path.to_owned(),
                    reason: format!("migrated CA certificate: {err}"),
                })?
                .1;
            let x509 = vec![X509Record {
                key_id: self.ca_key_id,
                state: KeyState::Active,
                certificate: tessera_plugin_sdk::x509::pem_encode(
                    "CERTIFICATE",
                    &self.ca_certificate,
                ),
                serial: serial_of_certificate(&self.ca_certificate).unwrap_or_default(),
                not_before: cert.validity().not_before.timestamp(),
                not_after: cert.validity().not_after.timestamp(),
                published_at: None,
                activated_at: Some(secs(now)),
                upstream_chain: Vec::new(),
                upstream_roots: Vec::new(),
            }];
            let Some((key_id, kid)) = self.jwt else {
                return Err(RotationError::Corrupt {
                    path: path.to_owned(),
                    reason: format!("the old {JWT_KEY_FILE} is missing; cannot migrate"),
                });
            };
            let stored_jwt = stored
                .map(|b| b.jwt_authorities.clone())
                .unwrap_or_default();
            let public = stored_jwt
                .iter()
                .find(|a| a.kid == kid)
                .map(|a| a.public_key.clone());
            let ttl = i64::try_from(config.jwt_key_ttl.as_secs()).unwrap_or(i64::MAX);
            let mut jwt = vec![JwtRecord {
                key_id,
                kid: kid.clone(),
                state: KeyState::Active,
                // Filled in from the key manager's key below when the bundle lacks it.
                public_key: public
                    .map(|der| tessera_plugin_sdk::x509::pem_encode("PUBLIC KEY", &der))
                    .unwrap_or_default(),
                not_before: secs(now),
                not_after: secs(now).saturating_add(ttl),
                published_at: None,
                activated_at: Some(secs(now)),
                expires_at: None,
            }];
            let keep =
                i64::try_from((config.max_jwt_svid_ttl + super::JWT_RETIREMENT_LEEWAY).as_secs())
                    .unwrap_or(i64::MAX);
            for old in stored_jwt.iter().filter(|a| a.kid != kid) {
                jwt.push(JwtRecord {
                    key_id: format!("{JWT_KEY_PREFIX}{}", old.kid),
                    kid: old.kid.clone(),
                    state: KeyState::Old,
                    public_key: tessera_plugin_sdk::x509::pem_encode("PUBLIC KEY", &old.public_key),
                    not_before: secs(now),
                    not_after: secs(now),
                    published_at: None,
                    activated_at: None,
                    expires_at: Some(old.expires_at.map_or(secs(now).saturating_add(keep), secs)),
                });
            }
            jwt.retain(|r| tessera_plugin_sdk::keymanager::validate_key_id(&r.key_id).is_ok());
            Ok(Journal {
                version: JOURNAL_VERSION,
                server_id: super::random_hex(16)?,
                x509,
                jwt,
            })
        }
    }

    /// Removes the migrated key files (the journal now names their copies). Best effort.
    pub fn remove_migrated(legacy_dir: &Path) {
        for name in [CA_KEY_FILE, JWT_KEY_FILE] {
            match std::fs::remove_file(legacy_dir.join(name)) {
                Ok(()) => tracing::info!(
                    path = %legacy_dir.join(name).display(),
                    "removed the migrated key file"
                ),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => tracing::warn!(
                    path = %legacy_dir.join(name).display(),
                    error = %err,
                    "cannot remove the migrated key file; remove it by hand"
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Admin API helpers.

impl From<RotationError> for crate::error::ApiError {
    fn from(err: RotationError) -> Self {
        if err.is_unavailable() {
            Self::Unavailable(err.to_string())
        } else {
            Self::Internal(format!("key rotation: {err}"))
        }
    }
}

/// `authority rotate-jwt-key`: prepares the next JWT key (unless one is prepared),
/// publishes it, waits `propagation` for connected agents to receive it, then activates
/// it. The replaced key stays published until its tokens have expired. Returns the new
/// kid.
pub async fn rotate_jwt_key(
    state: &crate::state::ServerState,
    propagation: Duration,
) -> Result<String, RotationError> {
    let rotation = &state.rotation;
    let old = state.jwt.current().kid().to_owned();
    rotation.prepare_jwt_now(SystemTime::now()).await?;
    if rotation
        .publish(state.datastore.as_ref(), SystemTime::now())
        .await?
    {
        state.publish_revision().await;
    }
    tokio::time::sleep(propagation).await;
    let kid = rotation.activate_jwt_now(SystemTime::now()).await?;
    if rotation
        .publish(state.datastore.as_ref(), SystemTime::now())
        .await?
    {
        state.publish_revision().await;
    }
    tracing::info!(old_kid = old, new_kid = kid, "JWT signing key replaced");
    Ok(kid)
}

/// `authority show`: every key with its state.
pub async fn list_authorities(
    state: &crate::state::ServerState,
) -> tessera_proto::admin::ListAuthoritiesResponse {
    let authorities = state
        .rotation
        .authorities()
        .await
        .into_iter()
        .map(|a| tessera_proto::admin::Authority {
            kind: a.kind.to_owned(),
            state: a.state.as_str().to_owned(),
            key_id: a.key_id,
            id: a.id,
            not_before: a.not_before,
            not_after: a.not_after,
            published_until: a.published_until.unwrap_or(0),
            activated_at: a.activated_at.unwrap_or(0),
            certificate: a.certificate_der,
        })
        .collect();
    tessera_proto::admin::ListAuthoritiesResponse {
        authorities,
        key_manager: state.rotation.key_manager().name().to_owned(),
        ca_ttl_seconds: i64::try_from(state.config.ca_ttl.as_secs()).unwrap_or(i64::MAX),
        jwt_key_ttl_seconds: i64::try_from(state.config.jwt_key_ttl.as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tessera_plugin_keymanager::{DiskKeyManager, MemoryKeyManager};
    use tessera_plugin_sdk::keymanager::SigningKey;

    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn config(journal_dir: Option<PathBuf>) -> RotationConfig {
        RotationConfig {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            ca_ttl: TTL,
            jwt_key_ttl: TTL,
            max_jwt_svid_ttl: Duration::from_secs(5),
            key_type: KeyType::EcP256,
            journal_dir,
            upstream: None,
        }
    }

    fn at(t0: SystemTime, secs: u64) -> SystemTime {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn schedule_follows_spire() {
        // Lifetime 600 s from 1000: prepare below 300 s left, activate below 100 s left.
        let step = |now, prepared| next_step(now, 1000, 1600, prepared);
        assert_eq!(step(1000, None), Step::Idle);
        assert_eq!(step(1300, None), Step::Idle);
        assert_eq!(step(1301, None), Step::Prepare);
        assert_eq!(step(1599, None), Step::Prepare);
        // Prepared but not published yet: never activated.
        assert_eq!(step(1550, Some(None)), Step::Idle);
        assert_eq!(step(1700, Some(None)), Step::Idle);
        // Published at 1302: activation below 1/6 left.
        assert_eq!(step(1400, Some(Some(1302))), Step::Idle);
        assert_eq!(step(1500, Some(Some(1302))), Step::Idle);
        assert_eq!(step(1501, Some(Some(1302))), Step::Activate);
        // Published late (after a key manager outage): waits lifetime/12 (50 s) ...
        assert_eq!(step(1560, Some(Some(1550))), Step::Idle);
        assert_eq!(step(1600, Some(Some(1550))), Step::Activate);
        // ... unless the active key has expired.
        assert_eq!(step(1600, Some(Some(1599))), Step::Activate);
        // The wait is at most a minute.
        assert_eq!(
            next_step(100_000 - 10, 0, 100_000, Some(Some(100_000 - 71))),
            Step::Activate
        );
        assert_eq!(
            check_interval(Duration::from_secs(12), Duration::from_secs(3600)),
            Duration::from_millis(500)
        );
        assert_eq!(
            check_interval(Duration::from_secs(86400), Duration::from_secs(86400)),
            MAX_CHECK_INTERVAL
        );
        assert_eq!(
            check_interval(Duration::from_secs(6), Duration::from_secs(6)),
            Duration::from_millis(250)
        );
    }

    fn record(key_id: &str, state: KeyState) -> X509Record {
        X509Record {
            key_id: key_id.into(),
            state,
            certificate: String::new(),
            serial: "01".into(),
            not_before: 0,
            not_after: 10,
            published_at: None,
            activated_at: None,
            upstream_chain: Vec::new(),
            upstream_roots: Vec::new(),
        }
    }

    fn jwt_record(key_id: &str, state: KeyState) -> JwtRecord {
        JwtRecord {
            key_id: key_id.into(),
            kid: "k".into(),
            state,
            public_key: String::new(),
            not_before: 0,
            not_after: 10,
            published_at: Some(1),
            activated_at: None,
            expires_at: None,
        }
    }

    #[test]
    fn journal_round_trip_and_checks() {
        let root = tempfile::tempdir().unwrap();
        let dir = private_dir(&root);
        let journal = Journal {
            version: JOURNAL_VERSION,
            server_id: "0123456789abcdef0123456789abcdef".into(),
            x509: vec![
                record("x509-ca-b", KeyState::Prepared),
                record("x509-ca-a", KeyState::Active),
            ],
            jwt: vec![
                jwt_record("jwt-a", KeyState::Active),
                jwt_record("jwt-0", KeyState::Old),
            ],
        };
        assert_eq!(Journal::load(dir.as_path()).unwrap(), None);
        journal.save(dir.as_path()).unwrap();
        assert_eq!(Journal::load(dir.as_path()).unwrap(), Some(journal.clone()));
        let mode = std::fs::metadata(dir.as_path().join(JOURNAL_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = String::from_utf8(journal.to_bytes()).unwrap();
        assert!(text.contains("\"state\": \"prepared\""), "{text}");

        let path = Path::new("rotation.json");
        let bad = |j: &Journal| Journal::parse(&j.to_bytes(), path).unwrap_err().to_string();
        let mut two_active = journal.clone();
        two_active.x509[0].state = KeyState::Active;
        assert!(
            bad(&two_active).contains("2 active"),
            "{}",
            bad(&two_active)
        );
        let mut no_jwt = journal.clone();
        no_jwt.jwt.clear();
        assert!(bad(&no_jwt).contains("jwt"));
        let mut version = journal.clone();
        version.version = 2;
        assert!(bad(&version).contains("version"));
        let mut bad_id = journal.clone();
        bad_id.x509[0].key_id = "../etc/passwd".into();
        assert!(bad(&bad_id).contains("invalid key id"));
        assert!(Journal::parse(b"{", path).is_err());
        assert!(
            Journal::parse(b"{\"version\":1,\"x509\":[],\"jwt\":[],\"extra\":1}", path).is_err()
        );
        // A world-readable journal is refused, not read.
        std::fs::set_permissions(
            dir.as_path().join(JOURNAL_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(Journal::load(dir.as_path()).is_err());
    }

    fn private_dir(root: &tempfile::TempDir) -> PathBuf {
        let dir = root.path().join("data");
        tessera_plugin_sdk::fs::ensure_private_dir(&dir).unwrap();
        dir
    }

    async fn datastore(dir: &Path) -> Arc<dyn Datastore> {
        crate::datastore::open_sqlite(&dir.join("datastore.sqlite3"))
            .await
            .unwrap()
    }

    /// The rotation of the data directory `data` (disk key manager), opened at `now`.
    async fn reopen(data: &Path, now: SystemTime) -> Rotation {
        Rotation::open_with(
            config(Some(data.to_owned())),
            disk(data).await,
            None,
            None,
            now,
        )
        .await
        .unwrap()
    }

    async fn disk(dir: &Path) -> Arc<dyn KeyManager> {
        Arc::new(DiskKeyManager::open(dir.join("keys")).await.unwrap())
    }

    async fn stored(ds: &dyn Datastore) -> StoredBundle {
        ds.get_bundle("example.org").await.unwrap().unwrap()
    }

    /// Two servers started from copies of one data directory share a server id; the
    /// first publication that finds the other's key under that id takes a new id, and
    /// neither server's keys leave the bundle.
    #[tokio::test]
    async fn a_copied_data_directory_gets_its_own_server_id() {
        let dir = tempfile::tempdir().unwrap();
        let data_a = private_dir(&dir);
        let ds = datastore(dir.path()).await;
        let now = SystemTime::now();
        let a = Rotation::open_with(
            config(Some(data_a.clone())),
            disk(&data_a).await,
            None,
            None,
            now,
        )
        .await
        .unwrap();
        a.publish(ds.as_ref(), now).await.unwrap();
        let data_b = dir.path().join("copy");
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&data_a)
            .arg(&data_b)
            .status()
            .unwrap();
        assert!(copied.success());
        let b = Rotation::open_with(
            config(Some(data_b.clone())),
            disk(&data_b).await,
            None,
            None,
            now,
        )
        .await
        .unwrap();
        let shared_id = a.journal().await.server_id;
        assert_eq!(b.journal().await.server_id, shared_id);

        // B prepares a JWT key of its own and publishes it under the shared id.
        assert!(b.prepare_jwt_now(now).await.unwrap());
        let b_kid = b
            .journal()
            .await
            .jwt_in(KeyState::Prepared)
            .unwrap()
            .kid
            .clone();
        assert!(b.publish(ds.as_ref(), now).await.unwrap());
        // A finds B's key under its id: it moves to a new id and keeps B's row intact.
        a.publish(ds.as_ref(), now).await.unwrap();
        let a_id = a.journal().await.server_id;
        assert_ne!(a_id, shared_id);
        assert_eq!(
            Journal::load(&data_a).unwrap().unwrap().server_id,
            a_id,
            "the new id is journaled"
        );
        let rows = ds.list_contributions("example.org").await.unwrap();
        let ids: BTreeSet<&str> = rows.iter().map(|r| r.server_id.as_str()).collect();
        assert_eq!(ids, BTreeSet::from([a_id.as_str(), shared_id.as_str()]));
        assert!(
            stored(ds.as_ref())
                .await
                .jwt_authorities
                .iter()
                .any(|k| k.kid == b_kid)
        );
        // B keeps its id: what is stored under it is its own.
        b.publish(ds.as_ref(), now).await.unwrap();
        assert_eq!(b.journal().await.server_id, shared_id);
        assert_eq!(ds.list_contributions("example.org").await.unwrap().len(), 2);
    }

    /// SECURITY.md §3.10 item 97: a crash after a key is prepared (journaled) and
    /// before it is published or active. The restart reloads the same key, never signs
    /// with it before it is published, and activates it on schedule.
    #[tokio::test]
    async fn crash_between_prepare_and_activate_reloads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = private_dir(&dir);
        let ds = datastore(&data).await;
        // Times in the past, so that certificates made "now" stay valid on the real
        // clock the CA's self-test uses.
        let t0 = SystemTime::now() - Duration::from_secs(40);

        let rotation = reopen(&data, t0).await;
        let first_serial = rotation.x509().serial_hex();
        let first_kid = rotation.jwt().current().kid().to_owned();
        assert!(rotation.publish(ds.as_ref(), t0).await.unwrap());
        assert_eq!(stored(ds.as_ref()).await.sequence_number, 1);
        assert!(
            !rotation.tick(at(t0, 20)).await.unwrap(),
            "half of the life left"
        );
        assert!(rotation.tick(at(t0, 31)).await.unwrap(), "prepared");
        let journal = rotation.journal().await;
        let prepared = journal.x509_in(KeyState::Prepared).unwrap().clone();
        let prepared_jwt = journal.jwt_in(KeyState::Prepared).unwrap().clone();
        assert_eq!(prepared.published_at, None);
        // Crash: nothing published, nothing activated.
        drop(rotation);

        let rotation = reopen(&data, at(t0, 32)).await;
        let journal = rotation.journal().await;
        assert_eq!(
            journal.x509_in(KeyState::Prepared),
            Some(&prepared),
            "same prepared CA"
        );
        assert_eq!(
            journal.jwt_in(KeyState::Prepared),
            Some(&prepared_jwt),
            "same prepared JWT key"
        );
        assert_eq!(rotation.x509().serial_hex(), first_serial);
        // Due, but not published: not activated.
        assert!(!rotation.tick(at(t0, 52)).await.unwrap());
        assert_eq!(rotation.x509().serial_hex(), first_serial);
        assert_eq!(rotation.jwt().current().kid(), first_kid);

        assert!(rotation.publish(ds.as_ref(), at(t0, 52)).await.unwrap());
        let bundle = stored(ds.as_ref()).await;
        assert_eq!(bundle.sequence_number, 2);
        assert_eq!(bundle.x509_authorities.len(), 2);
        assert_eq!(
            bundle.x509_authorities[1],
            pem_der(&prepared.certificate, Path::new("j")).unwrap()
        );
        assert_eq!(bundle.jwt_authorities.len(), 2);
        assert!(
            bundle
                .jwt_authorities
                .iter()
                .all(|a| a.expires_at.is_none())
        );
        // Published at 52: activated once it has been out for lifetime/12 (5 s).
        assert!(!rotation.tick(at(t0, 54)).await.unwrap());
        let activations = rotation.activations();
        assert!(rotation.tick(at(t0, 58)).await.unwrap());
        assert!(activations.has_changed().unwrap());
        assert_eq!(rotation.x509().serial_hex(), prepared.serial);
        assert_eq!(rotation.jwt().current().kid(), prepared_jwt.kid);
        let journal = rotation.journal().await;
        let old = journal.x509_in(KeyState::Old).unwrap();
        assert_eq!(old.serial, first_serial);
        assert_eq!(
            journal.jwt_in(KeyState::Old).unwrap().expires_at,
            Some(secs(at(t0, 58)) + 65)
        );
        // The old keys left the key manager; their public halves stay published.
        let km = disk(&data).await;
        let ids: Vec<String> = km
            .list_keys()
            .await
            .unwrap()
            .iter()
            .map(|k| k.id().to_owned())
            .collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(ids.contains(&prepared.key_id) && ids.contains(&prepared_jwt.key_id));
        assert!(rotation.publish(ds.as_ref(), at(t0, 58)).await.unwrap());
        let bundle = stored(ds.as_ref()).await;
        assert_eq!(bundle.sequence_number, 3);
        assert_eq!(bundle.x509_authorities.len(), 2);
        assert_eq!(
            bundle.x509_authorities[0],
            rotation.x509().certificate_der(),
            "active first"
        );
        assert_eq!(bundle.jwt_authorities.len(), 2);

        // The old CA leaves the bundle at its NotAfter (every SVID it signed has expired
        // by then); the old JWT key when its tokens have.
        assert!(rotation.tick(at(t0, 61)).await.unwrap());
        rotation.publish(ds.as_ref(), at(t0, 61)).await.unwrap();
        let bundle = stored(ds.as_ref()).await;
        assert_eq!(bundle.x509_authorities.len(), 1);
        assert_eq!(bundle.jwt_authorities.len(), 2);
        assert!(rotation.drop_expired(at(t0, 58 + 66)).await.unwrap());
        rotation
            .publish(ds.as_ref(), at(t0, 58 + 66))
            .await
            .unwrap();
        assert_eq!(stored(ds.as_ref()).await.jwt_authorities.len(), 1);

        // A restart after all that resumes with the same keys.
        let again = reopen(&data, at(t0, 40)).await;
        assert_eq!(again.x509().serial_hex(), prepared.serial);
        assert_eq!(again.jwt().current().kid(), prepared_jwt.kid);
        assert!(
            !again.publish(ds.as_ref(), at(t0, 40)).await.unwrap(),
            "nothing changed"
        );
    }

    #[tokio::test]
    async fn a_missing_key_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let data = private_dir(&dir);
        let rotation = reopen(&data, SystemTime::now()).await;
        let key_id = rotation.x509().active().key_id().to_owned();
        drop(rotation);
        std::fs::remove_file(data.join("keys").join(format!("{key_id}.key"))).unwrap();
        let err = Rotation::open_with(
            config(Some(data.clone())),
            disk(&data).await,
            None,
            None,
            SystemTime::now(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RotationError::MissingKey { .. }), "{err}");
        assert!(err.to_string().contains(&key_id), "{err}");
    }

    /// A key manager that fails with `Unavailable` while `down` is set.
    #[derive(Debug, Default)]
    struct Flaky {
        inner: MemoryKeyManager,
        down: AtomicBool,
    }

    #[async_trait::async_trait]
    impl KeyManager for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn generate_key(
            &self,
            id: &str,
            key_type: KeyType,
        ) -> Result<Arc<dyn SigningKey>, KeyManagerError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(KeyManagerError::unavailable(
                    format!("writing {id}"),
                    std::io::Error::from_raw_os_error(28),
                ));
            }
            self.inner.generate_key(id, key_type).await
        }
        async fn get_key(&self, id: &str) -> Result<Option<Arc<dyn SigningKey>>, KeyManagerError> {
            self.inner.get_key(id).await
        }
        async fn list_keys(&self) -> Result<Vec<Arc<dyn SigningKey>>, KeyManagerError> {
            self.inner.list_keys().await
        }
        async fn delete_key(&self, id: &str) -> Result<bool, KeyManagerError> {
            self.inner.delete_key(id).await
        }
    }

    /// SECURITY.md §3.10 item 103: the key manager is unavailable when the next key is
    /// due; the current keys stay, and the rotation happens once it is back.
    #[tokio::test]
    async fn unavailable_key_manager_keeps_the_current_keys() {
        let km = Arc::new(Flaky::default());
        let t0 = SystemTime::now() - Duration::from_secs(40);
        let rotation = Rotation::open_with(
            config(None),
            Arc::clone(&km) as Arc<dyn KeyManager>,
            None,
            None,
            t0,
        )
        .await
        .unwrap();
        let serial = rotation.x509().serial_hex();
        km.down.store(true, Ordering::SeqCst);
        let err = rotation.tick(at(t0, 31)).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert_eq!(rotation.x509().serial_hex(), serial);
        assert!(
            rotation
                .journal()
                .await
                .x509_in(KeyState::Prepared)
                .is_none()
        );
        km.down.store(false, Ordering::SeqCst);
        assert!(rotation.tick(at(t0, 32)).await.unwrap());
        assert!(
            rotation
                .journal()
                .await
                .x509_in(KeyState::Prepared)
                .is_some()
        );
        assert!(
            rotation
                .journal()
                .await
                .jwt_in(KeyState::Prepared)
                .is_some()
        );
    }

    #[tokio::test]
    async fn jwt_signer_over_a_key_manager_key_verifies() {
        let rotation = Rotation::open_with(
            config(None),
            Arc::new(MemoryKeyManager::new()),
            None,
            None,
            SystemTime::now(),
        )
        .await
        .unwrap();
        let signer = rotation.jwt().current();
        assert_eq!(signer.algorithm(), "ES256");
        assert!(
            signer.pkcs8().is_none(),
            "a managed key never leaves the key manager"
        );
        let td = TrustDomain::new("example.org").unwrap();
        let subject = tessera_plugin_sdk::SpiffeId::parse("spiffe://example.org/w").unwrap();
        let signed = signer
            .sign(
                &subject,
                &["aud".to_owned()],
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .unwrap();
        let bundle = tessera_plugin_sdk::jwt::JwtBundle::new(td, vec![signer.public_key()]);
        tessera_plugin_sdk::jwt::validate(&signed.token, "aud", &bundle, SystemTime::now())
            .unwrap();
    }

    /// A data dir of a server before the key manager: its CA and JWT key move into the
    /// key directory, the journal names them, and the old key files are removed.
    #[tokio::test]
    async fn old_key_files_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let data = private_dir(&dir);
        let legacy = data.join("ca");
        tessera_plugin_sdk::fs::ensure_private_dir(&legacy).unwrap();
        // What the old server wrote: a P-256 key and its CA certificate, the JWT key.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org".try_into().unwrap(),
        )];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x42, 0x17]));
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
        let cert = params.self_signed(&key).unwrap();
        tessera_plugin_sdk::fs::write_private_file(
            &legacy,
            crate::ca::CA_KEY_FILE,
            key.serialize_pem().as_bytes(),
        )
        .unwrap();
        tessera_plugin_sdk::fs::write_public_file(
            &legacy,
            crate::ca::CA_CERT_FILE,
            cert.pem().as_bytes(),
        )
        .unwrap();
        let jwt = JwtSigner::generate("0123abcd".into()).unwrap();
        let jwt_file = format!(
            "kid: 0123abcd\n{}",
            tessera_plugin_sdk::x509::pem_encode("PRIVATE KEY", &jwt.pkcs8().unwrap())
        );
        tessera_plugin_sdk::fs::write_private_file(
            &legacy,
            legacy::JWT_KEY_FILE,
            jwt_file.as_bytes(),
        )
        .unwrap();
        let retired = StoredJwtAuthority {
            kid: "retired".into(),
            public_key: JwtSigner::generate("retired".into())
                .unwrap()
                .public_key()
                .to_spki_der(),
            expires_at: Some(SystemTime::now() + Duration::from_secs(100)),
        };
        let stored = StoredBundle {
            trust_domain: "example.org".into(),
            x509_authorities: vec![cert.der().to_vec()],
            jwt_authorities: vec![
                StoredJwtAuthority {
                    kid: "0123abcd".into(),
                    public_key: jwt.public_key().to_spki_der(),
                    expires_at: None,
                },
                retired.clone(),
            ],
            sequence_number: 4,
        };

        let rotation = Rotation::open(
            config(Some(data.clone())),
            &KeyManagerConfig::default(),
            &data,
            Some(&stored),
            SystemTime::now(),
        )
        .await
        .unwrap();
        assert_eq!(
            rotation.x509().certificate_der(),
            cert.der().to_vec(),
            "same CA"
        );
        assert_eq!(
            rotation.x509().active().public_key_der(),
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
        assert_eq!(rotation.jwt().current().kid(), "0123abcd");
        assert_eq!(rotation.jwt().current().public_key(), jwt.public_key());
        assert!(!legacy.join(crate::ca::CA_KEY_FILE).exists());
        assert!(!legacy.join(legacy::JWT_KEY_FILE).exists());
        let (x509, jwts) = rotation.bundle_content().await.unwrap();
        assert_eq!(x509, stored.x509_authorities);
        assert_eq!(jwts.len(), 2, "the retired key stays published");
        assert_eq!(jwts[1].kid, "retired");
        let key_mode = std::fs::metadata(data.join("keys").join("x509-ca-4217.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        drop(rotation);
        // The next start uses the journal.
        let again = Rotation::open(
            config(Some(data.clone())),
            &KeyManagerConfig::default(),
            &data,
            Some(&stored),
            SystemTime::now(),
        )
        .await
        .unwrap();
        assert_eq!(again.x509().certificate_der(), cert.der().to_vec());
    }

    // -----------------------------------------------------------------------------------
    // Upstream authority.

    /// A test upstream root written as files (cert 0644, key 0600 in a 0755 directory).
    struct UpstreamFiles {
        config: UpstreamAuthorityConfig,
        root_der: Vec<u8>,
        key_path: PathBuf,
    }

    fn write_upstream(dir: &Path, not_after_in: Duration) -> UpstreamFiles {
        let up = dir.join("upstream");
        std::fs::create_dir_all(&up).unwrap();
        std::fs::set_permissions(&up, std::fs::Permissions::from_mode(0o755)).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "Test Upstream Root");
        params.distinguished_name = dn;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0x42]));
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc()
            + time::Duration::seconds(i64::try_from(not_after_in.as_secs()).unwrap());
        let cert = params.self_signed(&key).unwrap();
        let cert_path = up.join("upstream.pem");
        let key_path = up.join("upstream.key");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        UpstreamFiles {
            config: UpstreamAuthorityConfig::Disk {
                cert_file_path: cert_path,
                key_file_path: key_path.clone(),
                bundle_file_path: None,
            },
            root_der: cert.der().to_vec(),
            key_path,
        }
    }

    fn with_upstream(journal_dir: Option<PathBuf>, files: &UpstreamFiles) -> RotationConfig {
        RotationConfig {
            upstream: Some(files.config.clone()),
            ..config(journal_dir)
        }
    }

    /// webpki path validation of an issued chain (leaf first) against `roots`.
    fn verifies(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> bool {
        crate::ca::tests::verify_path(chain, roots).is_ok()
    }

    fn svid_chain(rotation: &Rotation) -> Vec<Vec<u8>> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        rotation
            .x509()
            .sign_x509_svid(
                &rcgen::PublicKeyData::subject_public_key_info(&key),
                &tessera_plugin_sdk::SpiffeId::parse("spiffe://example.org/w").unwrap(),
                &[],
                Duration::from_secs(5),
            )
            .unwrap()
            .cert_chain()
    }

    /// Every CA, the first and each rotated one, is signed by the upstream root; the
    /// bundle holds the root alone throughout, and each CA's SVIDs verify against it.
    /// A restart reloads the upstream-signed CAs from the journal.
    #[tokio::test]
    async fn upstream_signs_every_ca_and_the_bundle_is_its_root() {
        let dir = tempfile::tempdir().unwrap();
        let data = private_dir(&dir);
        let files = write_upstream(dir.path(), Duration::from_secs(30 * 24 * 3600));
        let ds = datastore(&data).await;
        let t0 = SystemTime::now() - Duration::from_secs(40);
        let rotation = Rotation::open_with(
            with_upstream(Some(data.clone()), &files),
            disk(&data).await,
            None,
            None,
            t0,
        )
        .await
        .unwrap();
        let first = rotation.x509().active();
        assert!(
            first.upstream().is_some(),
            "the first CA is upstream-signed"
        );
        let roots = vec![files.root_der.clone()];
        assert_eq!(rotation.bundle_content().await.unwrap().0, roots);
        rotation.publish(ds.as_ref(), t0).await.unwrap();
        assert_eq!(stored(ds.as_ref()).await.x509_authorities, roots);
        let chain = svid_chain(&rotation);
        assert_eq!(chain.len(), 2, "leaf and the server CA");
        assert_eq!(chain[1], first.certificate_der());
        assert!(verifies(&chain, &roots));

        // Prepared (upstream files read again), published, activated: still the root.
        assert!(rotation.tick(at(t0, 31)).await.unwrap());
        let journal = rotation.journal().await;
        let prepared = journal.x509_in(KeyState::Prepared).unwrap().clone();
        assert!(prepared.is_upstream_signed());
        assert!(prepared.upstream_chain.is_empty());
        assert_eq!(prepared.upstream_roots.len(), 1);
        rotation.publish(ds.as_ref(), at(t0, 31)).await.unwrap();
        assert_eq!(stored(ds.as_ref()).await.x509_authorities, roots);
        assert!(rotation.tick(at(t0, 52)).await.unwrap());
        assert_eq!(rotation.x509().serial_hex(), prepared.serial);
        rotation.publish(ds.as_ref(), at(t0, 52)).await.unwrap();
        assert_eq!(stored(ds.as_ref()).await.x509_authorities, roots);
        let chain = svid_chain(&rotation);
        assert_ne!(chain[1], first.certificate_der(), "signed by the new CA");
        assert!(verifies(&chain, &roots), "same bundle, new CA");
        // The journal records each CA's upstream roots.
        let text = String::from_utf8(rotation.journal().await.to_bytes()).unwrap();
        assert!(text.contains("\"upstream_roots\""), "{text}");
        drop(rotation);

        let again = Rotation::open_with(
            with_upstream(Some(data.clone()), &files),
            disk(&data).await,
            None,
            None,
            at(t0, 53),
        )
        .await
        .unwrap();
        assert_eq!(again.x509().serial_hex(), prepared.serial);
        assert_eq!(again.bundle_content().await.unwrap().0, roots);
        assert!(verifies(&svid_chain(&again), &roots));
        assert!(
            again.journal().await.x509_in(KeyState::Prepared).is_none(),
            "same upstream: nothing to switch"
        );
    }

    /// Switching a data dir to an upstream authority at restart: a prepared
    /// self-signed CA is dropped, an upstream-signed CA is prepared at once and
    /// published beside the old CA, and activated on the usual schedule. Switching back
    /// does the reverse; the replaced CA's anchor stays in the bundle until it expires.
    #[tokio::test]
    async fn switching_to_an_upstream_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let data = private_dir(&dir);
        let files = write_upstream(dir.path(), Duration::from_secs(30 * 24 * 3600));
        let ds = datastore(&data).await;
        let t0 = SystemTime::now() - Duration::from_secs(40);
        let plain = reopen(&data, t0).await;
        let self_signed = plain.x509().certificate_der();
        // A self-signed CA's journal record keeps its old shape: no upstream fields.
        let text = String::from_utf8(plain.journal().await.to_bytes()).unwrap();
        assert!(!text.contains("upstream"), "{text}");
        plain.publish(ds.as_ref(), t0).await.unwrap();
        assert!(plain.tick(at(t0, 31)).await.unwrap());
        let stale = plain
            .journal()
            .await
            .x509_in(KeyState::Prepared)
            .unwrap()
            .clone();
        assert!(!stale.is_upstream_signed());
        drop(plain);

        let switched = Rotation::open_with(
            with_upstream(Some(data.clone()), &files),
            disk(&data).await,
            None,
            None,
            at(t0, 32),
        )
        .await
        .unwrap();
        let journal = switched.journal().await;
        let prepared = journal.x509_in(KeyState::Prepared).unwrap().clone();
        assert!(
            prepared.is_upstream_signed(),
            "prepared under the upstream at once"
        );
        assert!(
            journal.x509.iter().all(|r| r.key_id != stale.key_id),
            "stale one dropped"
        );
        let km = disk(&data).await;
        assert!(km.get_key(&stale.key_id).await.unwrap().is_none());
        // Still signing with the self-signed CA until the schedule activates the new one.
        assert_eq!(switched.x509().certificate_der(), self_signed);
        assert_eq!(
            switched.bundle_content().await.unwrap().0,
            vec![self_signed.clone(), files.root_der.clone()],
            "the old CA and the upstream root"
        );
        switched.publish(ds.as_ref(), at(t0, 32)).await.unwrap();
        assert!(!switched.tick(at(t0, 40)).await.unwrap(), "not due yet");
        assert!(
            switched.tick(at(t0, 52)).await.unwrap(),
            "activated on schedule"
        );
        assert_eq!(switched.x509().serial_hex(), prepared.serial);
        assert_eq!(
            switched.bundle_content().await.unwrap().0,
            vec![files.root_der.clone(), self_signed.clone()],
            "the old self-signed CA stays until it expires"
        );
        assert!(verifies(
            &svid_chain(&switched),
            std::slice::from_ref(&files.root_der)
        ));
        drop(switched);

        // And back: a self-signed CA is prepared beside the upstream-signed active one.
        let back = reopen(&data, at(t0, 53)).await;
        let journal = back.journal().await;
        let prepared_back = journal.x509_in(KeyState::Prepared).unwrap().clone();
        assert!(!prepared_back.is_upstream_signed());
        assert_eq!(back.x509().serial_hex(), prepared.serial);
        let anchors = back.bundle_content().await.unwrap().0;
        assert_eq!(anchors[0], files.root_der);
        assert_eq!(
            anchors[1],
            pem_der(&prepared_back.certificate, Path::new("j")).unwrap()
        );
        assert!(anchors.contains(&self_signed));
    }

    /// A bad upstream authority stops the start, naming the configuration key.
    #[tokio::test]
    async fn a_bad_upstream_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let data = private_dir(&dir);
        let files = write_upstream(dir.path(), Duration::from_secs(30 * 24 * 3600));
        std::fs::set_permissions(&files.key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Rotation::open_with(
            with_upstream(Some(data.clone()), &files),
            disk(&data).await,
            None,
            None,
            SystemTime::now(),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("server.upstream_authority.key_file_path"),
            "{err}"
        );
        assert!(Journal::load(&data).unwrap().is_none(), "nothing written");

        // An upstream that expires before a CA's lifetime: the CA is clamped to it.
        let dir = tempfile::tempdir().unwrap();
        let files = write_upstream(dir.path(), Duration::from_secs(30));
        let rotation = Rotation::open_with(
            with_upstream(None, &files),
            Arc::new(MemoryKeyManager::new()),
            None,
            None,
            SystemTime::now(),
        )
        .await
        .unwrap();
        let ca = rotation.x509().active();
        let upstream_end = x509_parser::parse_x509_certificate(&files.root_der)
            .unwrap()
            .1
            .validity()
            .not_after
            .timestamp();
        assert_eq!(secs(ca.not_after()), upstream_end);
    }
}
