//! The embedded SQLite implementation of [`Datastore`], the default store of a
//! single server.
//!
//! sqlx runs each SQLite connection on its own worker thread, so no query blocks the
//! runtime. SQLite allows one writer at a time; to never hit `SQLITE_BUSY_SNAPSHOT`
//! (a read transaction that later tries to write after another writer committed):
//!
//! - concurrency-critical writes are single statements (join token consumption);
//! - multi-statement writes (the write plus its change-feed row) start with
//!   `BEGIN IMMEDIATE`, which takes the write lock up front, waiting up to the busy
//!   timeout for it;
//! - multi-statement reads use a plain (deferred) transaction, which never writes.
//!
//! Because writers are serialised, revisions are handed out in commit order: a reader
//! that sees revision N also sees every revision below it, so the change feed has no
//! gaps. (A PostgreSQL implementation must get the same property another way, e.g. by
//! taking a lock on the feed in each writing transaction.)
//!
//! Migrations live in `server/migrations/sqlite/` and are embedded with `include_str!`
//! (sqlx's `migrate!` macro needs the `macros` feature, which the workspace does not
//! enable); a test checks the embedded list matches the directory.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use sqlx::error::DatabaseError as _;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteError, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlSafeStr, Sqlite, Transaction};
use tessera_plugin_sdk::{RegistrationEntry, Selector, SpiffeId, TrustDomain};

use super::{
    AttestedAgent, AuthorityContribution, Change, ChangeKind, ChangeSet, Datastore, DatastoreError,
    EndpointProfile, FederationRelationship, InstanceSvid, NewEntry, NewJoinToken, Revocation,
    RevokedSerial, StoredBundle, TokenOutcome, check_server_id, from_unix_secs, json_list,
    jwt_authorities_json, merge_contributions, new_entry_id, normalize_jwt_audiences,
    now_unix_secs, similarity_key, stored_bool, stored_json_list, stored_jwt_authorities,
    stored_spiffe_id, stored_spiffe_id_template, stored_u64, to_unix_secs, ttl_to_secs,
};

/// The migrations, in version order: (version, description, SQL). Every file of
/// `server/migrations/sqlite/` must be listed here (checked by a test).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/sqlite/0001_initial.sql"),
    ),
    (
        2,
        "jwt",
        include_str!("../../migrations/sqlite/0002_jwt.sql"),
    ),
    (
        3,
        "revocation",
        include_str!("../../migrations/sqlite/0003_revocation.sql"),
    ),
    (
        4,
        "federation",
        include_str!("../../migrations/sqlite/0004_federation.sql"),
    ),
    (
        5,
        "authority_contributions",
        include_str!("../../migrations/sqlite/0005_authority_contributions.sql"),
    ),
];

/// How long a statement waits for SQLite's write lock before failing `Unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a caller waits for a pooled connection before failing `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pool size: SQLite serialises writers anyway; this bounds concurrent readers.
const MAX_CONNECTIONS: u32 = 8;

/// The columns of `entries` read back into a [`RegistrationEntry`], in a `SELECT`.
macro_rules! select_entries {
    ($tail:literal) => {
        concat!(
            "SELECT id, spiffe_id, parent_id, selectors, x509_svid_ttl_secs, ",
            "jwt_svid_ttl_secs, jwt_audiences, jwt_multi_audience, dns_names, hint, ",
            "federates_with, created_revision, revision FROM entries ",
            $tail
        )
    };
}

/// The columns of `agents` read back into an [`AttestedAgent`], in a `SELECT`.
macro_rules! select_agents {
    ($tail:literal) => {
        concat!(
            "SELECT spiffe_id, attestation_type, serial, previous_serial, expires_at, aliases, ",
            "first_attested_at, last_seen_at, banned_at FROM agents ",
            $tail
        )
    };
}

/// `MAX(latest recorded revision, pruned_through)`: the current revision even when
/// every change has been pruned.
const CURRENT_REVISION: &str = "SELECT MAX(COALESCE((SELECT MAX(revision) FROM changes), 0), \
     (SELECT pruned_through FROM change_feed WHERE id = 1))";

/// The SQLite datastore. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub(crate) struct SqliteDatastore {
    pool: SqlitePool,
}

impl SqliteDatastore {
    /// See [`super::open_sqlite`].
    pub(crate) async fn open(path: &Path) -> Result<Self, DatastoreError> {
        create_private_file(path).await?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a consumed join token or a rotated serial survives a power loss.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(DatastoreError::from)?;
        migrator()
            .run(&pool)
            .await
            .map_err(|e| DatastoreError::Migration(Box::new(e)))?;
        Ok(Self { pool })
    }

    /// Starts a transaction holding the write lock (`BEGIN IMMEDIATE`).
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, DatastoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Creates the database file with mode 0600 when it does not exist yet (SQLite would
/// create it with the umask's mode; its `-wal` and `-shm` files copy the mode of the
/// database file). An existing file is left alone.
async fn create_private_file(path: &Path) -> Result<(), DatastoreError> {
    tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .await
        .map(drop)
        .map_err(|e| DatastoreError::Unavailable(Box::new(e)))
}

/// The embedded migrations as a sqlx [`Migrator`].
fn migrator() -> Migrator {
    migrator_of(MIGRATIONS)
}

/// A sqlx [`Migrator`] of some of the embedded migrations (tests build older schemas).
fn migrator_of(migrations: &[(i64, &'static str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

impl From<sqlx::Error> for DatastoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Database(db) => {
                if db.kind() == sqlx::error::ErrorKind::UniqueViolation {
                    return Self::Conflict("unique constraint violated".to_owned());
                }
                // Primary result codes (https://www.sqlite.org/rescode.html).
                let primary = db
                    .try_downcast_ref::<SqliteError>()
                    .and_then(|s| s.code())
                    .and_then(|c| c.parse::<i32>().ok())
                    .map(|c| c & 0xff);
                match primary {
                    // BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL
                    Some(5 | 6 | 7 | 8 | 10 | 13 | 14 | 15) => Self::Unavailable(db.into()),
                    // CORRUPT, NOTADB
                    Some(11 | 26) => Self::Corrupt(format!("database file: {}", db.message())),
                    _ => Self::Internal(db.into()),
                }
            }
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => Self::Unavailable(Box::new(e)),
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                Self::Corrupt(format!("undecodable column: {e}"))
            }
            sqlx::Error::Migrate(m) => Self::Migration(m),
            other => Self::Internal(Box::new(other)),
        }
    }
}

/// Records one change in the feed (inside the caller's write transaction) and returns
/// its revision.
async fn record_change(
    conn: &mut SqliteConnection,
    kind: ChangeKind,
    object_id: &str,
    scope: &[&str],
) -> Result<u64, DatastoreError> {
    let mut scope: Vec<&str> = scope.to_vec();
    scope.sort_unstable();
    scope.dedup();
    let scope = serde_json::to_string(&scope).map_err(|e| DatastoreError::Internal(Box::new(e)))?;
    let revision: i64 = sqlx::query_scalar(
        "INSERT INTO changes (kind, object_id, recorded_at, scope) VALUES (?, ?, ?, ?) \
         RETURNING revision",
    )
    .bind(kind.as_str())
    .bind(object_id)
    .bind(now_unix_secs())
    .bind(scope)
    .fetch_one(conn)
    .await?;
    stored_u64(revision, "changes.revision")
}

/// Inserts or replaces an agent inside a write transaction, recording the change;
/// [`DatastoreError::AgentBanned`] (nothing written) when the stored agent is banned.
async fn upsert_agent_in(
    conn: &mut SqliteConnection,
    agent: &AttestedAgent,
) -> Result<(), DatastoreError> {
    let expires_at = to_unix_secs(agent.expires_at, "agent expires_at")?;
    let first_attested_at = to_unix_secs(agent.first_attested_at, "agent first_attested_at")?;
    let last_seen_at = to_unix_secs(agent.last_seen_at, "agent last_seen_at")?;
    let aliases = json_list(&agent.aliases)?;

    // One statement decides: a banned row is left alone (the DO UPDATE's WHERE is
    // false, so no row changes).
    let written = sqlx::query(
        "INSERT INTO agents (spiffe_id, attestation_type, serial, previous_serial, \
         expires_at, aliases, first_attested_at, last_seen_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (spiffe_id) DO UPDATE SET \
           attestation_type = excluded.attestation_type, \
           serial = excluded.serial, \
           previous_serial = excluded.previous_serial, \
           expires_at = excluded.expires_at, \
           aliases = excluded.aliases, \
           first_attested_at = MIN(agents.first_attested_at, excluded.first_attested_at), \
           last_seen_at = excluded.last_seen_at \
         WHERE agents.banned_at IS NULL",
    )
    .bind(agent.spiffe_id.as_str())
    .bind(&agent.attestation_type)
    .bind(&agent.serial)
    .bind(agent.previous_serial.as_deref())
    .bind(expires_at)
    .bind(&aliases)
    .bind(first_attested_at)
    .bind(last_seen_at)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if written == 0 {
        return Err(DatastoreError::AgentBanned);
    }
    record_change(
        conn,
        ChangeKind::AgentUpdated,
        agent.spiffe_id.as_str(),
        &[],
    )
    .await?;
    Ok(())
}

fn entry_from_row(row: &SqliteRow) -> Result<RegistrationEntry, DatastoreError> {
    let id: String = row.try_get("id")?;
    let what = |col: &str| format!("entries[{id}].{col}");
    let spiffe_id =
        stored_spiffe_id_template(&row.try_get::<String, _>("spiffe_id")?, &what("spiffe_id"))?;
    let parent_id = stored_spiffe_id(&row.try_get::<String, _>("parent_id")?, &what("parent_id"))?;
    let selectors = stored_json_list(
        &row.try_get::<String, _>("selectors")?,
        &what("selectors"),
        Selector::parse,
    )?;
    let ttl = |col: &str| -> Result<Option<Duration>, DatastoreError> {
        row.try_get::<Option<i64>, _>(col)?
            .map(|s| stored_u64(s, &what(col)).map(Duration::from_secs))
            .transpose()
    };
    let x509_svid_ttl = ttl("x509_svid_ttl_secs")?;
    let jwt_svid_ttl = ttl("jwt_svid_ttl_secs")?;
    let jwt_audiences = stored_json_list(
        &row.try_get::<String, _>("jwt_audiences")?,
        &what("jwt_audiences"),
        |s| Ok::<_, std::convert::Infallible>(s.to_owned()),
    )?;
    let jwt_multi_audience = stored_bool(
        row.try_get("jwt_multi_audience")?,
        &what("jwt_multi_audience"),
    )?;
    let dns_names = stored_json_list(
        &row.try_get::<String, _>("dns_names")?,
        &what("dns_names"),
        |s| Ok::<_, std::convert::Infallible>(s.to_owned()),
    )?;
    let hint: String = row.try_get("hint")?;
    let federates_with = stored_json_list(
        &row.try_get::<String, _>("federates_with")?,
        &what("federates_with"),
        TrustDomain::new,
    )?;
    let created_revision = stored_u64(row.try_get("created_revision")?, &what("created_revision"))?;
    let revision = stored_u64(row.try_get("revision")?, &what("revision"))?;
    Ok(RegistrationEntry {
        id,
        spiffe_id,
        parent_id,
        selectors,
        x509_svid_ttl,
        jwt_svid_ttl,
        jwt_audiences,
        jwt_multi_audience,
        dns_names,
        hint,
        federates_with,
        created_revision,
        revision,
    })
}

fn agent_from_row(row: &SqliteRow) -> Result<AttestedAgent, DatastoreError> {
    let raw_id: String = row.try_get("spiffe_id")?;
    // An unparseable key cannot name its row; the message names the column only.
    let spiffe_id = stored_spiffe_id(&raw_id, "agents.spiffe_id")?;
    let what = |col: &str| format!("agents[{spiffe_id}].{col}");
    Ok(AttestedAgent {
        attestation_type: row.try_get("attestation_type")?,
        serial: row.try_get("serial")?,
        previous_serial: row.try_get("previous_serial")?,
        expires_at: from_unix_secs(row.try_get("expires_at")?, &what("expires_at"))?,
        aliases: stored_json_list(
            &row.try_get::<String, _>("aliases")?,
            &what("aliases"),
            SpiffeId::parse,
        )?,
        first_attested_at: from_unix_secs(
            row.try_get("first_attested_at")?,
            &what("first_attested_at"),
        )?,
        last_seen_at: from_unix_secs(row.try_get("last_seen_at")?, &what("last_seen_at"))?,
        banned_at: row
            .try_get::<Option<i64>, _>("banned_at")?
            .map(|t| from_unix_secs(t, &what("banned_at")))
            .transpose()?,
        spiffe_id,
    })
}

fn bundle_from_row(row: &SqliteRow) -> Result<StoredBundle, DatastoreError> {
    let trust_domain: String = row.try_get("trust_domain")?;
    let what = |col: &str| format!("bundles[{trust_domain}].{col}");
    let x509_authorities = stored_json_list(
        &row.try_get::<String, _>("x509_authorities")?,
        &what("x509_authorities"),
        |s| hex::decode(s),
    )?;
    let jwt_authorities = stored_jwt_authorities(
        &row.try_get::<String, _>("jwt_authorities")?,
        &what("jwt_authorities"),
    )?;
    let sequence_number = stored_u64(row.try_get("sequence_number")?, &what("sequence_number"))?;
    Ok(StoredBundle {
        trust_domain,
        x509_authorities,
        jwt_authorities,
        sequence_number,
    })
}

/// The contributions to `trust_domain`'s bundle, ordered by server id.
async fn contributions_in(
    conn: &mut SqliteConnection,
    trust_domain: &str,
) -> Result<Vec<AuthorityContribution>, DatastoreError> {
    let rows = sqlx::query(
        "SELECT server_id, x509_authorities, jwt_authorities, expires_at \
         FROM authority_contributions WHERE trust_domain = ? ORDER BY server_id",
    )
    .bind(trust_domain)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            let server_id: String = row.try_get("server_id")?;
            let what =
                |col: &str| format!("authority_contributions[{trust_domain}/{server_id}].{col}");
            Ok(AuthorityContribution {
                trust_domain: trust_domain.to_owned(),
                x509_authorities: stored_json_list(
                    &row.try_get::<String, _>("x509_authorities")?,
                    &what("x509_authorities"),
                    |s| hex::decode(s),
                )?,
                jwt_authorities: stored_jwt_authorities(
                    &row.try_get::<String, _>("jwt_authorities")?,
                    &what("jwt_authorities"),
                )?,
                expires_at: from_unix_secs(row.try_get("expires_at")?, &what("expires_at"))?,
                server_id,
            })
        })
        .collect()
}

/// Deletes a bundle inside a write transaction, recording [`ChangeKind::BundleDeleted`]
/// when there was one.
async fn delete_bundle_in(
    conn: &mut SqliteConnection,
    trust_domain: &str,
) -> Result<bool, DatastoreError> {
    let deleted = sqlx::query("DELETE FROM bundles WHERE trust_domain = ?")
        .bind(trust_domain)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Ok(false);
    }
    record_change(conn, ChangeKind::BundleDeleted, trust_domain, &[]).await?;
    Ok(true)
}

/// The `endpoint_spiffe_id` column of a profile.
fn endpoint_id_column(profile: &EndpointProfile) -> Option<&str> {
    match profile {
        EndpointProfile::HttpsWeb => None,
        EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => Some(endpoint_spiffe_id.as_str()),
    }
}

fn relationship_from_row(row: &SqliteRow) -> Result<FederationRelationship, DatastoreError> {
    let raw: String = row.try_get("trust_domain")?;
    let trust_domain = TrustDomain::new(&raw).map_err(|e| {
        DatastoreError::Corrupt(format!(
            "federation_relationships.trust_domain: invalid trust domain: {e}"
        ))
    })?;
    let what = |col: &str| format!("federation_relationships[{trust_domain}].{col}");
    let profile: String = row.try_get("profile")?;
    let endpoint_id: Option<String> = row.try_get("endpoint_spiffe_id")?;
    let profile = match (profile.as_str(), endpoint_id) {
        ("https_web", _) => EndpointProfile::HttpsWeb,
        ("https_spiffe", Some(id)) => EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: stored_spiffe_id(&id, &what("endpoint_spiffe_id"))?,
        },
        _ => {
            return Err(DatastoreError::Corrupt(format!(
                "{}: unknown profile or missing endpoint SPIFFE ID",
                what("profile")
            )));
        }
    };
    Ok(FederationRelationship {
        bundle_endpoint_url: row.try_get("bundle_endpoint_url")?,
        profile,
        trust_domain,
    })
}

fn change_from_row(row: &SqliteRow) -> Result<Change, DatastoreError> {
    let revision = stored_u64(row.try_get("revision")?, "changes.revision")?;
    let kind: String = row.try_get("kind")?;
    let kind = ChangeKind::from_stored(&kind).ok_or_else(|| {
        DatastoreError::Corrupt(format!("changes[{revision}].kind: unknown kind"))
    })?;
    let scope: String = row.try_get("scope")?;
    let scope = serde_json::from_str(&scope).map_err(|_| {
        DatastoreError::Corrupt(format!(
            "changes[{revision}].scope: not a JSON list of strings"
        ))
    })?;
    Ok(Change {
        revision,
        kind,
        object_id: row.try_get("object_id")?,
        scope,
    })
}

/// A `revocations` row (`spiffe_id, revoked_at, expires_at, scope`) with its serials.
fn revocation_from_row(
    row: &SqliteRow,
    serials: Vec<String>,
) -> Result<Revocation, DatastoreError> {
    let raw_id: String = row.try_get("spiffe_id")?;
    let spiffe_id = stored_spiffe_id(&raw_id, "revocations.spiffe_id")?;
    let what = |col: &str| format!("revocations[{spiffe_id}].{col}");
    Ok(Revocation {
        revoked_at: from_unix_secs(row.try_get("revoked_at")?, &what("revoked_at"))?,
        expires_at: from_unix_secs(row.try_get("expires_at")?, &what("expires_at"))?,
        scope: stored_json_list(
            &row.try_get::<String, _>("scope")?,
            &what("scope"),
            SpiffeId::parse,
        )?,
        serials,
        spiffe_id,
    })
}

/// The revocation of `spiffe_id` with its serials, read inside `conn`'s transaction.
async fn revocation_in(
    conn: &mut SqliteConnection,
    spiffe_id: &str,
) -> Result<Option<Revocation>, DatastoreError> {
    let Some(row) = sqlx::query(
        "SELECT spiffe_id, revoked_at, expires_at, scope FROM revocations WHERE spiffe_id = ?",
    )
    .bind(spiffe_id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let serials: Vec<String> =
        sqlx::query_scalar("SELECT serial FROM instance_svids WHERE spiffe_id = ? ORDER BY serial")
            .bind(spiffe_id)
            .fetch_all(&mut *conn)
            .await?;
    revocation_from_row(&row, serials).map(Some)
}

/// Reads the current revision inside `conn`'s transaction (or as its own statement).
async fn current_revision_in(conn: &mut SqliteConnection) -> Result<u64, DatastoreError> {
    let revision: i64 = sqlx::query_scalar(CURRENT_REVISION).fetch_one(conn).await?;
    stored_u64(revision, "current revision")
}

/// A revision handed out by [`record_change`], for binding.
fn revision_to_i64(revision: u64) -> Result<i64, DatastoreError> {
    i64::try_from(revision)
        .map_err(|_| DatastoreError::Corrupt("changes.revision: out of range".to_owned()))
}

/// Maps the unique violation of an entry write (only `similarity_key` can collide: ids
/// are random and never change) to a [`DatastoreError::Conflict`] that says so.
fn similar_entry_conflict(e: sqlx::Error) -> DatastoreError {
    match DatastoreError::from(e) {
        DatastoreError::Conflict(_) => DatastoreError::Conflict(
            "an entry with the same spiffe_id, parent_id and selectors exists".to_owned(),
        ),
        other => other,
    }
}

/// A [`NewEntry`] checked and converted to the `entries` columns, ready for binding.
struct EntryColumns {
    /// The entry, with its JWT audiences normalized.
    entry: NewEntry,
    similarity_key: String,
    selectors: String,
    x509_svid_ttl_secs: Option<i64>,
    jwt_svid_ttl_secs: Option<i64>,
    jwt_audiences: String,
    dns_names: String,
    federates_with: String,
}

impl EntryColumns {
    /// Validates and converts `entry`; [`DatastoreError::InvalidArgument`] when it
    /// cannot be stored.
    fn new(mut entry: NewEntry) -> Result<Self, DatastoreError> {
        let x509_svid_ttl_secs = entry
            .x509_svid_ttl
            .map(|t| ttl_to_secs(t, "x509_svid_ttl"))
            .transpose()?;
        let jwt_svid_ttl_secs = entry
            .jwt_svid_ttl
            .map(|t| ttl_to_secs(t, "jwt_svid_ttl"))
            .transpose()?;
        entry.jwt_audiences = normalize_jwt_audiences(std::mem::take(&mut entry.jwt_audiences))?;
        entry.federates_with.sort();
        entry.federates_with.dedup();
        Ok(Self {
            federates_with: json_list(
                &entry
                    .federates_with
                    .iter()
                    .map(TrustDomain::name)
                    .collect::<Vec<_>>(),
            )?,
            similarity_key: similarity_key(&entry.spiffe_id, &entry.parent_id, &entry.selectors)?,
            selectors: json_list(&entry.selectors)?,
            jwt_audiences: json_list(&entry.jwt_audiences)?,
            dns_names: json_list(&entry.dns_names)?,
            x509_svid_ttl_secs,
            jwt_svid_ttl_secs,
            entry,
        })
    }

    /// The stored entry.
    fn into_entry(self, id: String, created_revision: u64, revision: u64) -> RegistrationEntry {
        let e = self.entry;
        RegistrationEntry {
            id,
            spiffe_id: e.spiffe_id,
            parent_id: e.parent_id,
            selectors: e.selectors,
            x509_svid_ttl: e.x509_svid_ttl,
            jwt_svid_ttl: e.jwt_svid_ttl,
            jwt_audiences: e.jwt_audiences,
            jwt_multi_audience: e.jwt_multi_audience,
            dns_names: e.dns_names,
            hint: e.hint,
            federates_with: e.federates_with,
            created_revision,
            revision,
        }
    }
}

#[async_trait::async_trait]
impl Datastore for SqliteDatastore {
    async fn create_entry(&self, entry: NewEntry) -> Result<RegistrationEntry, DatastoreError> {
        let id = new_entry_id()?;
        let row = EntryColumns::new(entry)?;

        let mut tx = self.begin_write().await?;
        let revision = record_change(
            &mut tx,
            ChangeKind::EntryUpserted,
            &id,
            &[row.entry.parent_id.as_str()],
        )
        .await?;
        let revision_i64 = revision_to_i64(revision)?;
        let inserted = sqlx::query(
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors, similarity_key, \
             x509_svid_ttl_secs, jwt_svid_ttl_secs, jwt_audiences, jwt_multi_audience, \
             dns_names, hint, federates_with, created_revision, revision) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(row.entry.spiffe_id.as_str())
        .bind(row.entry.parent_id.as_str())
        .bind(&row.selectors)
        .bind(&row.similarity_key)
        .bind(row.x509_svid_ttl_secs)
        .bind(row.jwt_svid_ttl_secs)
        .bind(&row.jwt_audiences)
        .bind(row.entry.jwt_multi_audience)
        .bind(&row.dns_names)
        .bind(&row.entry.hint)
        .bind(&row.federates_with)
        .bind(revision_i64)
        .bind(revision_i64)
        .execute(&mut *tx)
        .await;
        inserted.map_err(similar_entry_conflict)?;
        tx.commit().await?;

        Ok(row.into_entry(id, revision, revision))
    }

    async fn update_entry(
        &self,
        id: &str,
        entry: NewEntry,
    ) -> Result<Option<RegistrationEntry>, DatastoreError> {
        let row = EntryColumns::new(entry)?;

        let mut tx = self.begin_write().await?;
        let old_parent: Option<String> =
            sqlx::query_scalar("SELECT parent_id FROM entries WHERE id = ?")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(old_parent) = old_parent else {
            tx.rollback().await?;
            return Ok(None);
        };
        let revision = record_change(
            &mut tx,
            ChangeKind::EntryUpserted,
            id,
            &[old_parent.as_str(), row.entry.parent_id.as_str()],
        )
        .await?;
        let updated: Result<Option<i64>, _> = sqlx::query_scalar(
            "UPDATE entries SET spiffe_id = ?, parent_id = ?, selectors = ?, \
             similarity_key = ?, x509_svid_ttl_secs = ?, jwt_svid_ttl_secs = ?, \
             jwt_audiences = ?, jwt_multi_audience = ?, dns_names = ?, hint = ?, \
             federates_with = ?, revision = ? \
             WHERE id = ? RETURNING created_revision",
        )
        .bind(row.entry.spiffe_id.as_str())
        .bind(row.entry.parent_id.as_str())
        .bind(&row.selectors)
        .bind(&row.similarity_key)
        .bind(row.x509_svid_ttl_secs)
        .bind(row.jwt_svid_ttl_secs)
        .bind(&row.jwt_audiences)
        .bind(row.entry.jwt_multi_audience)
        .bind(&row.dns_names)
        .bind(&row.entry.hint)
        .bind(&row.federates_with)
        .bind(revision_to_i64(revision)?)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await;
        let Some(created_revision) = updated.map_err(similar_entry_conflict)? else {
            // Also undoes the change row, so the revision is not consumed.
            tx.rollback().await?;
            return Ok(None);
        };
        let created_revision =
            stored_u64(created_revision, &format!("entries[{id}].created_revision"))?;
        tx.commit().await?;

        Ok(Some(row.into_entry(
            id.to_owned(),
            created_revision,
            revision,
        )))
    }

    async fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>, DatastoreError> {
        sqlx::query(select_entries!("WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(entry_from_row)
            .transpose()
    }

    async fn list_entries(&self) -> Result<Vec<RegistrationEntry>, DatastoreError> {
        sqlx::query(select_entries!("ORDER BY id"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(entry_from_row)
            .collect()
    }

    async fn list_entries_by_parent(
        &self,
        parent_ids: &[SpiffeId],
    ) -> Result<Vec<RegistrationEntry>, DatastoreError> {
        if parent_ids.is_empty() {
            return Ok(Vec::new());
        }
        // One static statement for any number of parents: the IDs travel as a JSON
        // array and are compared as exact strings.
        let parents = json_list(parent_ids)?;
        sqlx::query(select_entries!(
            "WHERE parent_id IN (SELECT value FROM json_each(?)) ORDER BY id"
        ))
        .bind(parents)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(entry_from_row)
        .collect()
    }

    async fn delete_entry(&self, id: &str) -> Result<bool, DatastoreError> {
        let mut tx = self.begin_write().await?;
        let parent: Option<String> =
            sqlx::query_scalar("DELETE FROM entries WHERE id = ? RETURNING parent_id")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(parent) = parent else {
            tx.rollback().await?;
            return Ok(false);
        };
        record_change(&mut tx, ChangeKind::EntryDeleted, id, &[parent.as_str()]).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn create_join_token(&self, token: NewJoinToken) -> Result<(), DatastoreError> {
        let expires_at = to_unix_secs(token.expires_at, "join token expires_at")?;
        let result = sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, alias, expires_at, used_at) \
             VALUES (?, ?, ?, ?, NULL)",
        )
        .bind(&token.id)
        .bind(&token.secret_hash[..])
        .bind(token.alias.as_ref().map(SpiffeId::as_str))
        .bind(expires_at)
        .execute(&self.pool)
        .await;
        match result.map_err(DatastoreError::from) {
            Ok(_) => Ok(()),
            Err(DatastoreError::Conflict(_)) => Err(DatastoreError::Conflict(
                "a join token with this id exists".to_owned(),
            )),
            Err(e) => Err(e),
        }
    }

    async fn consume_join_token(
        &self,
        id: &str,
        secret_hash: &[u8; 32],
        now: SystemTime,
    ) -> Result<TokenOutcome, DatastoreError> {
        let now = to_unix_secs(now, "now")?;
        // The one statement that decides: SQLite runs it under the write lock, so of N
        // concurrent callers exactly one sees `used_at IS NULL`.
        let consumed: Option<Option<String>> = sqlx::query_scalar(
            "UPDATE join_tokens SET used_at = ? \
             WHERE id = ? AND secret_hash = ? AND used_at IS NULL AND expires_at > ? \
             RETURNING alias",
        )
        .bind(now)
        .bind(id)
        .bind(&secret_hash[..])
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(alias) = consumed {
            let alias = alias
                .map(|a| stored_spiffe_id(&a, &format!("join_tokens[{id}].alias")))
                .transpose()?;
            return Ok(TokenOutcome::Consumed { alias });
        }

        // Not consumable. An expired, unused token is useless to anyone: delete it, and
        // say "expired" only to a caller who holds its secret.
        let expired_hash: Option<Vec<u8>> = sqlx::query_scalar(
            "DELETE FROM join_tokens WHERE id = ? AND used_at IS NULL AND expires_at <= ? \
             RETURNING secret_hash",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match expired_hash {
            Some(hash) if hash.as_slice() == secret_hash.as_slice() => TokenOutcome::Expired,
            _ => TokenOutcome::Invalid,
        })
    }

    async fn upsert_agent(&self, agent: AttestedAgent) -> Result<(), DatastoreError> {
        let mut tx = self.begin_write().await?;
        upsert_agent_in(&mut tx, &agent).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn attest_with_join_token(
        &self,
        id: &str,
        secret_hash: &[u8; 32],
        now: SystemTime,
        mut agent: AttestedAgent,
    ) -> Result<TokenOutcome, DatastoreError> {
        let now_secs = to_unix_secs(now, "now")?;
        let mut tx = self.begin_write().await?;
        let consumed: Option<Option<String>> = sqlx::query_scalar(
            "UPDATE join_tokens SET used_at = ? \
             WHERE id = ? AND secret_hash = ? AND used_at IS NULL AND expires_at > ? \
             RETURNING alias",
        )
        .bind(now_secs)
        .bind(id)
        .bind(&secret_hash[..])
        .bind(now_secs)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(alias) = consumed else {
            tx.rollback().await?;
            // Not consumable: the same answer (and expired-token cleanup) as
            // `consume_join_token`, which now consumes nothing.
            return self.consume_join_token(id, secret_hash, now).await;
        };
        let alias = alias
            .map(|a| stored_spiffe_id(&a, &format!("join_tokens[{id}].alias")))
            .transpose()?;
        if let Some(alias) = alias.as_ref().filter(|a| !agent.aliases.contains(a)) {
            agent.aliases.push(alias.clone());
        }
        upsert_agent_in(&mut tx, &agent).await?;
        tx.commit().await?;
        Ok(TokenOutcome::Consumed { alias })
    }

    async fn get_agent(
        &self,
        spiffe_id: &SpiffeId,
    ) -> Result<Option<AttestedAgent>, DatastoreError> {
        sqlx::query(select_agents!("WHERE spiffe_id = ?"))
            .bind(spiffe_id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(agent_from_row)
            .transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AttestedAgent>, DatastoreError> {
        sqlx::query(select_agents!("ORDER BY spiffe_id"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(agent_from_row)
            .collect()
    }

    async fn rotate_agent_serial(
        &self,
        spiffe_id: &SpiffeId,
        current_serial: &str,
        new_serial: &str,
        new_expires_at: SystemTime,
    ) -> Result<bool, DatastoreError> {
        if new_serial == current_serial {
            return Err(DatastoreError::InvalidArgument(
                "the new agent serial equals the current one".to_owned(),
            ));
        }
        let expires_at = to_unix_secs(new_expires_at, "agent expires_at")?;
        let mut tx = self.begin_write().await?;
        let rotated = sqlx::query(
            "UPDATE agents SET previous_serial = ?, serial = ?, expires_at = ? \
             WHERE spiffe_id = ? AND banned_at IS NULL \
               AND (serial = ? OR (previous_serial IS NOT NULL AND previous_serial = ?))",
        )
        .bind(current_serial)
        .bind(new_serial)
        .bind(expires_at)
        .bind(spiffe_id.as_str())
        .bind(current_serial)
        .bind(current_serial)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if rotated == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        record_change(&mut tx, ChangeKind::AgentUpdated, spiffe_id.as_str(), &[]).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn confirm_agent_serial(
        &self,
        spiffe_id: &SpiffeId,
        serial: &str,
    ) -> Result<(), DatastoreError> {
        // Hot path (every call from an agent): a read, and the write lock only when a
        // previous serial is still remembered.
        let pending: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM agents WHERE spiffe_id = ? AND serial = ? AND previous_serial IS NOT NULL",
        )
        .bind(spiffe_id.as_str())
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        if pending.is_none() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        let confirmed = sqlx::query(
            "UPDATE agents SET previous_serial = NULL \
             WHERE spiffe_id = ? AND serial = ? AND previous_serial IS NOT NULL",
        )
        .bind(spiffe_id.as_str())
        .bind(serial)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if confirmed == 0 {
            tx.rollback().await?;
            return Ok(());
        }
        record_change(&mut tx, ChangeKind::AgentUpdated, spiffe_id.as_str(), &[]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_bundle(&self, trust_domain: &str) -> Result<Option<StoredBundle>, DatastoreError> {
        sqlx::query(
            "SELECT trust_domain, x509_authorities, jwt_authorities, sequence_number \
             FROM bundles WHERE trust_domain = ?",
        )
        .bind(trust_domain)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(bundle_from_row)
        .transpose()
    }

    async fn set_bundle(&self, bundle: StoredBundle) -> Result<(), DatastoreError> {
        let sequence_number = i64::try_from(bundle.sequence_number).map_err(|_| {
            DatastoreError::InvalidArgument("bundle sequence number above i64::MAX".to_owned())
        })?;
        let authorities: Vec<String> = bundle.x509_authorities.iter().map(hex::encode).collect();
        let authorities = json_list(&authorities)?;
        let jwt_authorities = jwt_authorities_json(&bundle.jwt_authorities)?;

        let mut tx = self.begin_write().await?;
        let revision = record_change(
            &mut tx,
            ChangeKind::BundleUpdated,
            &bundle.trust_domain,
            &[],
        )
        .await?;
        let revision = revision_to_i64(revision)?;
        sqlx::query(
            "INSERT INTO bundles (trust_domain, x509_authorities, jwt_authorities, \
             sequence_number, revision) \
             VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (trust_domain) DO UPDATE SET \
               x509_authorities = excluded.x509_authorities, \
               jwt_authorities = excluded.jwt_authorities, \
               sequence_number = excluded.sequence_number, \
               revision = excluded.revision",
        )
        .bind(&bundle.trust_domain)
        .bind(&authorities)
        .bind(&jwt_authorities)
        .bind(sequence_number)
        .bind(revision)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn publish_authorities(
        &self,
        contribution: AuthorityContribution,
        now: SystemTime,
    ) -> Result<bool, DatastoreError> {
        check_server_id(&contribution.server_id)?;
        let authorities: Vec<String> = contribution
            .x509_authorities
            .iter()
            .map(hex::encode)
            .collect();
        let authorities = json_list(&authorities)?;
        let jwt_authorities = jwt_authorities_json(&contribution.jwt_authorities)?;
        let expires_at = to_unix_secs(contribution.expires_at, "contribution expires_at")?;
        let now = to_unix_secs(now, "now")?;
        let td = contribution.trust_domain.as_str();

        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO authority_contributions (trust_domain, server_id, x509_authorities, \
             jwt_authorities, expires_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (trust_domain, server_id) DO UPDATE SET \
               x509_authorities = excluded.x509_authorities, \
               jwt_authorities = excluded.jwt_authorities, \
               expires_at = excluded.expires_at, \
               updated_at = excluded.updated_at",
        )
        .bind(td)
        .bind(&contribution.server_id)
        .bind(&authorities)
        .bind(&jwt_authorities)
        .bind(expires_at)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM authority_contributions \
             WHERE trust_domain = ? AND server_id <> ? AND expires_at <= ?",
        )
        .bind(td)
        .bind(&contribution.server_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let contributions = contributions_in(&mut tx, td).await?;
        let (x509, jwt) = merge_contributions(&contributions);
        let stored = sqlx::query(
            "SELECT trust_domain, x509_authorities, jwt_authorities, sequence_number \
             FROM bundles WHERE trust_domain = ?",
        )
        .bind(td)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(bundle_from_row)
        .transpose()?;
        if stored
            .as_ref()
            .is_some_and(|b| b.x509_authorities == x509 && b.jwt_authorities == jwt)
        {
            tx.commit().await?;
            return Ok(false);
        }
        let sequence_number = stored.map_or(Ok(1), |b| {
            i64::try_from(b.sequence_number)
                .ok()
                .and_then(|n| n.checked_add(1))
                .ok_or_else(|| {
                    DatastoreError::Corrupt(format!("bundles[{td}].sequence_number: out of range"))
                })
        })?;
        let revision = record_change(&mut tx, ChangeKind::BundleUpdated, td, &[]).await?;
        let revision = revision_to_i64(revision)?;
        let hex_x509: Vec<String> = x509.iter().map(hex::encode).collect();
        sqlx::query(
            "INSERT INTO bundles (trust_domain, x509_authorities, jwt_authorities, \
             sequence_number, revision) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (trust_domain) DO UPDATE SET \
               x509_authorities = excluded.x509_authorities, \
               jwt_authorities = excluded.jwt_authorities, \
               sequence_number = excluded.sequence_number, \
               revision = excluded.revision",
        )
        .bind(td)
        .bind(json_list(&hex_x509)?)
        .bind(jwt_authorities_json(&jwt)?)
        .bind(sequence_number)
        .bind(revision)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn list_contributions(
        &self,
        trust_domain: &str,
    ) -> Result<Vec<AuthorityContribution>, DatastoreError> {
        let mut conn = self.pool.acquire().await?;
        contributions_in(&mut conn, trust_domain).await
    }

    async fn list_bundles(&self) -> Result<Vec<StoredBundle>, DatastoreError> {
        sqlx::query(
            "SELECT trust_domain, x509_authorities, jwt_authorities, sequence_number \
             FROM bundles ORDER BY trust_domain",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(bundle_from_row)
        .collect()
    }

    async fn delete_bundle(&self, trust_domain: &str) -> Result<bool, DatastoreError> {
        let mut tx = self.begin_write().await?;
        let deleted = delete_bundle_in(&mut tx, trust_domain).await?;
        if deleted {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(deleted)
    }

    async fn create_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<(), DatastoreError> {
        let now = now_unix_secs();
        let td = relationship.trust_domain.name().to_owned();
        let mut tx = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO federation_relationships (trust_domain, bundle_endpoint_url, \
             profile, endpoint_spiffe_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&td)
        .bind(&relationship.bundle_endpoint_url)
        .bind(relationship.profile.name())
        .bind(endpoint_id_column(&relationship.profile))
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await;
        inserted.map_err(|e| match DatastoreError::from(e) {
            DatastoreError::Conflict(_) => {
                DatastoreError::Conflict(format!("a federation relationship with {td} exists"))
            }
            other => other,
        })?;
        record_change(&mut tx, ChangeKind::FederationUpdated, &td, &[]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn update_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<bool, DatastoreError> {
        let td = relationship.trust_domain.name();
        let mut tx = self.begin_write().await?;
        let updated = sqlx::query(
            "UPDATE federation_relationships SET bundle_endpoint_url = ?, profile = ?, \
             endpoint_spiffe_id = ?, updated_at = ? WHERE trust_domain = ?",
        )
        .bind(&relationship.bundle_endpoint_url)
        .bind(relationship.profile.name())
        .bind(endpoint_id_column(&relationship.profile))
        .bind(now_unix_secs())
        .bind(td)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        record_change(&mut tx, ChangeKind::FederationUpdated, td, &[]).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn get_federation_relationship(
        &self,
        trust_domain: &str,
    ) -> Result<Option<FederationRelationship>, DatastoreError> {
        sqlx::query(
            "SELECT trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id \
             FROM federation_relationships WHERE trust_domain = ?",
        )
        .bind(trust_domain)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(relationship_from_row)
        .transpose()
    }

    async fn list_federation_relationships(
        &self,
    ) -> Result<Vec<FederationRelationship>, DatastoreError> {
        sqlx::query(
            "SELECT trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id \
             FROM federation_relationships ORDER BY trust_domain",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(relationship_from_row)
        .collect()
    }

    async fn delete_federation_relationship(
        &self,
        trust_domain: &str,
    ) -> Result<bool, DatastoreError> {
        let mut tx = self.begin_write().await?;
        let deleted = sqlx::query("DELETE FROM federation_relationships WHERE trust_domain = ?")
            .bind(trust_domain)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        record_change(&mut tx, ChangeKind::FederationUpdated, trust_domain, &[]).await?;
        delete_bundle_in(&mut tx, trust_domain).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn ban_agent(
        &self,
        spiffe_id: &SpiffeId,
        now: SystemTime,
    ) -> Result<Option<AttestedAgent>, DatastoreError> {
        let now = to_unix_secs(now, "banned_at")?;
        let mut tx = self.begin_write().await?;
        let banned = sqlx::query(
            "UPDATE agents SET banned_at = ? WHERE spiffe_id = ? AND banned_at IS NULL",
        )
        .bind(now)
        .bind(spiffe_id.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if banned > 0 {
            record_change(
                &mut tx,
                ChangeKind::AgentBanned,
                spiffe_id.as_str(),
                &[spiffe_id.as_str()],
            )
            .await?;
        }
        let agent = sqlx::query(select_agents!("WHERE spiffe_id = ?"))
            .bind(spiffe_id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(agent_from_row)
            .transpose()?;
        tx.commit().await?;
        Ok(agent)
    }

    async fn evict_agent(&self, spiffe_id: &SpiffeId) -> Result<bool, DatastoreError> {
        let mut tx = self.begin_write().await?;
        let deleted = sqlx::query("DELETE FROM agents WHERE spiffe_id = ?")
            .bind(spiffe_id.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        record_change(
            &mut tx,
            ChangeKind::AgentEvicted,
            spiffe_id.as_str(),
            &[spiffe_id.as_str()],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn revoke_identity(
        &self,
        spiffe_id: &SpiffeId,
        revoked_at: SystemTime,
        expires_at: SystemTime,
        scope: &[SpiffeId],
    ) -> Result<(Revocation, bool), DatastoreError> {
        let revoked_at = to_unix_secs(revoked_at, "revoked_at")?;
        let expires_at = to_unix_secs(expires_at, "revocation expires_at")?;
        let mut scope: Vec<&str> = scope.iter().map(SpiffeId::as_str).collect();
        scope.sort_unstable();
        scope.dedup();
        let scope_json =
            serde_json::to_string(&scope).map_err(|e| DatastoreError::Internal(Box::new(e)))?;

        let mut tx = self.begin_write().await?;
        // One statement: a revocation in force is kept as it is (idempotence); an
        // expired one not yet pruned is replaced.
        let written = sqlx::query(
            "INSERT INTO revocations (spiffe_id, revoked_at, expires_at, scope) \
             VALUES (?1, ?2, MAX(?3, COALESCE( \
                 (SELECT MAX(expires_at) FROM instance_svids WHERE spiffe_id = ?1), 0)), ?4) \
             ON CONFLICT (spiffe_id) DO UPDATE SET \
               revoked_at = excluded.revoked_at, \
               expires_at = excluded.expires_at, \
               scope = excluded.scope \
             WHERE revocations.expires_at <= ?2",
        )
        .bind(spiffe_id.as_str())
        .bind(revoked_at)
        .bind(expires_at)
        .bind(&scope_json)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let created = written > 0;
        if created {
            record_change(
                &mut tx,
                ChangeKind::IdentityRevoked,
                spiffe_id.as_str(),
                &scope,
            )
            .await?;
        }
        let revocation = revocation_in(&mut tx, spiffe_id.as_str())
            .await?
            .ok_or_else(|| {
                DatastoreError::Internal("the revocation just written is missing".into())
            })?;
        tx.commit().await?;
        Ok((revocation, created))
    }

    async fn get_revocation(
        &self,
        spiffe_id: &SpiffeId,
    ) -> Result<Option<Revocation>, DatastoreError> {
        // One read transaction: the revocation and its serials from one snapshot.
        let mut tx = self.pool.begin().await?;
        let revocation = revocation_in(&mut tx, spiffe_id.as_str()).await?;
        tx.rollback().await?;
        Ok(revocation)
    }

    async fn list_revocations(&self) -> Result<Vec<Revocation>, DatastoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT spiffe_id, revoked_at, expires_at, scope FROM revocations ORDER BY spiffe_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let serials: Vec<(String, String)> = sqlx::query_as(
            "SELECT s.spiffe_id, s.serial FROM instance_svids s \
             JOIN revocations r ON r.spiffe_id = s.spiffe_id ORDER BY s.serial",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        let mut by_id: std::collections::HashMap<String, Vec<String>> =
            std::collections::HashMap::new();
        for (id, serial) in serials {
            by_id.entry(id).or_default().push(serial);
        }
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("spiffe_id")?;
                let serials = by_id.remove(&id).unwrap_or_default();
                revocation_from_row(row, serials)
            })
            .collect()
    }

    async fn revoked_among(
        &self,
        ids: &[SpiffeId],
        now: SystemTime,
    ) -> Result<BTreeSet<String>, DatastoreError> {
        if ids.is_empty() {
            return Ok(BTreeSet::new());
        }
        let now = to_unix_secs(now, "now")?;
        let revoked: Vec<String> = sqlx::query_scalar(
            "SELECT spiffe_id FROM revocations \
             WHERE spiffe_id IN (SELECT value FROM json_each(?)) AND expires_at > ?",
        )
        .bind(json_list(ids)?)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(revoked.into_iter().collect())
    }

    async fn record_instance_svids(
        &self,
        svids: &[InstanceSvid],
    ) -> Result<Vec<bool>, DatastoreError> {
        if svids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = svids
            .iter()
            .map(|svid| {
                Ok((
                    svid.spiffe_id.as_str(),
                    svid.serial.as_str(),
                    to_unix_secs(svid.expires_at, "instance SVID expires_at")?,
                ))
            })
            .collect::<Result<Vec<_>, DatastoreError>>()?;
        let serials: Vec<&str> = rows.iter().map(|(_, serial, _)| *serial).collect();
        let serials_json =
            serde_json::to_string(&serials).map_err(|e| DatastoreError::Internal(Box::new(e)))?;

        // Insert first, then take back what a revocation in force covers, all under the
        // write lock: a concurrent `revoke_identity` runs wholly before (and is seen
        // here) or wholly after (and lists the serials).
        let mut tx = self.begin_write().await?;
        for (spiffe_id, serial, expires_at) in &rows {
            sqlx::query(
                "INSERT INTO instance_svids (serial, spiffe_id, expires_at) VALUES (?, ?, ?)",
            )
            .bind(*serial)
            .bind(*spiffe_id)
            .bind(*expires_at)
            .execute(&mut *tx)
            .await?;
        }
        let withdrawn: Vec<String> = sqlx::query_scalar(
            "DELETE FROM instance_svids \
             WHERE serial IN (SELECT value FROM json_each(?1)) \
               AND spiffe_id IN (SELECT spiffe_id FROM revocations WHERE expires_at > ?2) \
             RETURNING serial",
        )
        .bind(&serials_json)
        .bind(now_unix_secs())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|(_, serial, _)| !withdrawn.iter().any(|w| w == serial))
            .collect())
    }

    async fn revoked_serials(&self, now: SystemTime) -> Result<Vec<RevokedSerial>, DatastoreError> {
        let now = to_unix_secs(now, "now")?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT s.serial, r.revoked_at FROM instance_svids s \
             JOIN revocations r ON r.spiffe_id = s.spiffe_id \
             WHERE s.expires_at > ?1 AND r.expires_at > ?1 ORDER BY s.serial",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(serial, revoked_at)| {
                let revoked_at =
                    from_unix_secs(revoked_at, &format!("revocations[{serial}].revoked_at"))?;
                Ok(RevokedSerial { serial, revoked_at })
            })
            .collect()
    }

    async fn prune_revocations(&self, now: SystemTime) -> Result<u64, DatastoreError> {
        let now = to_unix_secs(now, "now")?;
        let mut tx = self.begin_write().await?;
        let revocations = sqlx::query("DELETE FROM revocations WHERE expires_at <= ?")
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let serials = sqlx::query("DELETE FROM instance_svids WHERE expires_at <= ?")
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(revocations + serials)
    }

    async fn current_revision(&self) -> Result<u64, DatastoreError> {
        let mut conn = self.pool.acquire().await?;
        current_revision_in(&mut conn).await
    }

    async fn changes_since(&self, revision: u64) -> Result<ChangeSet, DatastoreError> {
        // A revision beyond i64 is beyond anything this datastore handed out.
        let Ok(since) = i64::try_from(revision) else {
            return Ok(ChangeSet::TooOld);
        };
        // One read transaction: the feed bounds and the rows come from one snapshot.
        let mut tx = self.pool.begin().await?;
        let current = current_revision_in(&mut tx).await?;
        let pruned_through: i64 =
            sqlx::query_scalar("SELECT pruned_through FROM change_feed WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        let pruned_through = stored_u64(pruned_through, "change_feed.pruned_through")?;
        if revision > current || revision < pruned_through {
            tx.rollback().await?;
            return Ok(ChangeSet::TooOld);
        }
        let rows = sqlx::query(
            "SELECT revision, kind, object_id, scope FROM changes WHERE revision > ? ORDER BY revision",
        )
        .bind(since)
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        rows.iter()
            .map(change_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map(ChangeSet::Complete)
    }

    async fn prune_changes(&self, keep: u64) -> Result<u64, DatastoreError> {
        let mut tx = self.begin_write().await?;
        let current = current_revision_in(&mut tx).await?;
        let cutoff = current.saturating_sub(keep);
        let pruned_through: i64 =
            sqlx::query_scalar("SELECT pruned_through FROM change_feed WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        let pruned_through = stored_u64(pruned_through, "change_feed.pruned_through")?;
        if cutoff <= pruned_through {
            tx.rollback().await?;
            return Ok(0);
        }
        let cutoff = i64::try_from(cutoff)
            .map_err(|_| DatastoreError::Corrupt("changes.revision: out of range".to_owned()))?;
        let removed = sqlx::query("DELETE FROM changes WHERE revision <= ?")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("UPDATE change_feed SET pruned_through = ? WHERE id = 1")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(removed)
    }

    async fn ping(&self) -> Result<(), DatastoreError> {
        let _: i64 = sqlx::query_scalar("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::UNIX_EPOCH;

    use super::super::{MAX_JWT_AUDIENCE_LEN, MAX_JWT_AUDIENCES, StoredJwtAuthority, open_sqlite};
    use super::*;

    const AGENT_A: &str = "spiffe://example.org/tessera/agent/join_token/a";
    const AGENT_B: &str = "spiffe://example.org/tessera/agent/join_token/b";
    const ALIAS: &str = "spiffe://example.org/node/rack-1";

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn new_entry(path: &str, parent: &str, selectors: &[&str]) -> NewEntry {
        NewEntry {
            spiffe_id: id(&format!("spiffe://example.org/{path}")).into(),
            parent_id: id(parent),
            selectors: selectors
                .iter()
                .map(|s| Selector::parse(s).unwrap())
                .collect(),
            x509_svid_ttl: Some(Duration::from_secs(300)),
            jwt_svid_ttl: Some(Duration::from_secs(120)),
            jwt_audiences: vec!["https://api.example.org".to_owned()],
            jwt_multi_audience: false,
            dns_names: vec!["bot.example.org".to_owned()],
            hint: "internal".to_owned(),
            federates_with: Vec::new(),
        }
    }

    fn token(token_id: &str, secret: u8, expires_at: SystemTime) -> NewJoinToken {
        NewJoinToken {
            id: token_id.to_owned(),
            secret_hash: [secret; 32],
            alias: Some(id(ALIAS)),
            expires_at,
        }
    }

    fn agent(agent_id: &str, serial: &str) -> AttestedAgent {
        AttestedAgent {
            spiffe_id: id(agent_id),
            attestation_type: "join_token".to_owned(),
            serial: serial.to_owned(),
            previous_serial: None,
            expires_at: at(2_000_000_000),
            aliases: vec![id(ALIAS)],
            first_attested_at: at(1_700_000_000),
            last_seen_at: at(1_700_000_100),
            banned_at: None,
        }
    }

    fn bundle(td: &str, seq: u64) -> StoredBundle {
        StoredBundle {
            trust_domain: td.to_owned(),
            x509_authorities: vec![vec![0x30, 0x82, 0x01, seq as u8], vec![0x30, 0x03]],
            jwt_authorities: vec![
                StoredJwtAuthority {
                    kid: format!("key-{seq}"),
                    public_key: vec![0x30, 0x59, seq as u8],
                    expires_at: None,
                },
                StoredJwtAuthority {
                    kid: "old".to_owned(),
                    public_key: vec![0x30, 0x2a],
                    expires_at: Some(at(1_900_000_000)),
                },
            ],
            sequence_number: seq,
        }
    }

    /// A datastore on a fresh file in a temp dir (the concrete type, so tests can also
    /// reach the pool for raw SQL).
    async fn open_temp() -> (tempfile::TempDir, SqliteDatastore) {
        let dir = tempfile::tempdir().unwrap();
        let ds = SqliteDatastore::open(&dir.path().join("datastore.sqlite3"))
            .await
            .unwrap();
        (dir, ds)
    }

    fn complete(set: ChangeSet) -> Vec<(u64, ChangeKind, String)> {
        match set {
            ChangeSet::Complete(changes) => changes
                .into_iter()
                .map(|c| (c.revision, c.kind, c.object_id))
                .collect(),
            ChangeSet::TooOld => panic!("expected a complete change set"),
        }
    }

    #[test]
    fn embedded_migrations_match_the_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        assert_eq!(
            files.len(),
            MIGRATIONS.len(),
            "list every migration file in MIGRATIONS"
        );
        for (file, &(version, description, sql)) in files.iter().zip(MIGRATIONS) {
            assert_eq!(file, &format!("{version:04}_{description}.sql"));
            assert_eq!(std::fs::read_to_string(dir.join(file)).unwrap(), sql);
        }
    }

    #[tokio::test]
    async fn open_sets_wal_private_mode_and_is_idempotent() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds.sqlite3");
        let ds = open_sqlite(&path).await.unwrap();
        ds.ping().await.unwrap();
        assert_eq!(ds.current_revision().await.unwrap(), 0);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        ds.close().await;
        assert!(matches!(
            ds.ping().await,
            Err(DatastoreError::Unavailable(_))
        ));

        // Migrations already applied: opening again is fine.
        let ds = SqliteDatastore::open(&path).await.unwrap();
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&ds.pool)
            .await
            .unwrap();
        assert_eq!(journal, "wal");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&ds.pool)
            .await
            .unwrap();
        assert_eq!(fk, 1);
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(&ds.pool)
            .await
            .unwrap();
        assert_eq!(busy, 5000);
    }

    #[tokio::test]
    async fn entry_crud_bumps_revisions() {
        let (_dir, ds) = open_temp().await;
        let a = ds
            .create_entry(new_entry("ai/research-bot", AGENT_A, &["unix:uid:1000"]))
            .await
            .unwrap();
        assert_eq!(a.id.len(), 32);
        assert!(
            a.id.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!((a.created_revision, a.revision), (1, 1));
        assert_eq!(ds.current_revision().await.unwrap(), 1);

        let b = ds
            .create_entry(new_entry(
                "ai/writer",
                AGENT_A,
                &["unix:uid:1001", "unix:gid:50"],
            ))
            .await
            .unwrap();
        assert_eq!((b.created_revision, b.revision), (2, 2));
        assert_ne!(a.id, b.id);

        // Round trip keeps every field.
        assert_eq!(ds.get_entry(&a.id).await.unwrap(), Some(a.clone()));
        assert_eq!(ds.get_entry(&b.id).await.unwrap(), Some(b.clone()));
        assert_eq!(
            ds.get_entry("0123456789abcdef0123456789abcdef")
                .await
                .unwrap(),
            None
        );

        let mut sorted = vec![a.clone(), b.clone()];
        sorted.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(ds.list_entries().await.unwrap(), sorted);

        // A default TTL and empty lists round-trip too.
        let mut bare = new_entry("ai/bare", AGENT_B, &["unix:uid:7"]);
        bare.x509_svid_ttl = None;
        bare.jwt_svid_ttl = None;
        bare.jwt_audiences.clear();
        bare.dns_names.clear();
        bare.hint.clear();
        let c = ds.create_entry(bare).await.unwrap();
        assert_eq!(ds.get_entry(&c.id).await.unwrap(), Some(c.clone()));

        assert!(ds.delete_entry(&a.id).await.unwrap());
        assert_eq!(ds.current_revision().await.unwrap(), 4);
        assert_eq!(ds.get_entry(&a.id).await.unwrap(), None);
        // Deleting an absent entry records nothing.
        assert!(!ds.delete_entry(&a.id).await.unwrap());
        assert_eq!(ds.current_revision().await.unwrap(), 4);
        assert_eq!(ds.list_entries().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn similar_entry_is_a_conflict_and_bumps_nothing() {
        let (_dir, ds) = open_temp().await;
        ds.create_entry(new_entry(
            "ai/bot",
            AGENT_A,
            &["unix:uid:1000", "unix:gid:5"],
        ))
        .await
        .unwrap();
        // Same ID, parent and selector set (other order, a duplicate): refused.
        let err = ds
            .create_entry(new_entry(
                "ai/bot",
                AGENT_A,
                &["unix:gid:5", "unix:uid:1000", "unix:gid:5"],
            ))
            .await
            .unwrap_err();
        assert!(matches!(err, DatastoreError::Conflict(_)), "{err:?}");
        assert_eq!(ds.current_revision().await.unwrap(), 1);
        // Another parent or selector set is a different entry.
        ds.create_entry(new_entry(
            "ai/bot",
            AGENT_B,
            &["unix:uid:1000", "unix:gid:5"],
        ))
        .await
        .unwrap();
        ds.create_entry(new_entry("ai/bot", AGENT_A, &["unix:uid:1000"]))
            .await
            .unwrap();
        assert_eq!(ds.current_revision().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn sub_second_ttl_is_refused() {
        let (_dir, ds) = open_temp().await;
        let mut e = new_entry("ai/bot", AGENT_A, &["unix:uid:1"]);
        e.x509_svid_ttl = Some(Duration::from_millis(1500));
        assert!(matches!(
            ds.create_entry(e).await,
            Err(DatastoreError::InvalidArgument(_))
        ));
        assert_eq!(ds.current_revision().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn list_entries_by_parent_matches_exact_ids() {
        let (_dir, ds) = open_temp().await;
        let a1 = ds
            .create_entry(new_entry("w/1", AGENT_A, &["unix:uid:1"]))
            .await
            .unwrap();
        let a2 = ds
            .create_entry(new_entry("w/2", AGENT_A, &["unix:uid:2"]))
            .await
            .unwrap();
        let b1 = ds
            .create_entry(new_entry("w/3", AGENT_B, &["unix:uid:3"]))
            .await
            .unwrap();
        let n1 = ds
            .create_entry(new_entry("w/4", ALIAS, &["unix:uid:4"]))
            .await
            .unwrap();
        // A parent that only shares a prefix with an agent ID.
        ds.create_entry(new_entry("w/5", &format!("{AGENT_A}x"), &["unix:uid:5"]))
            .await
            .unwrap();

        let sorted = |mut v: Vec<RegistrationEntry>| {
            v.sort_by(|x, y| x.id.cmp(&y.id));
            v
        };
        assert_eq!(
            ds.list_entries_by_parent(&[id(AGENT_A)]).await.unwrap(),
            sorted(vec![a1.clone(), a2.clone()])
        );
        assert_eq!(
            ds.list_entries_by_parent(&[id(AGENT_A), id(ALIAS)])
                .await
                .unwrap(),
            sorted(vec![a1, a2, n1])
        );
        assert_eq!(
            ds.list_entries_by_parent(&[id(AGENT_B)]).await.unwrap(),
            vec![b1]
        );
        assert!(ds.list_entries_by_parent(&[]).await.unwrap().is_empty());
        assert!(
            ds.list_entries_by_parent(&[id("spiffe://example.org/nobody")])
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn changes_since_reports_every_kind_of_write() {
        let (_dir, ds) = open_temp().await;
        let e1 = ds
            .create_entry(new_entry("w/1", AGENT_A, &["unix:uid:1"]))
            .await
            .unwrap();
        let e2 = ds
            .create_entry(new_entry("w/2", AGENT_A, &["unix:uid:2"]))
            .await
            .unwrap();
        ds.set_bundle(bundle("example.org", 1)).await.unwrap();
        ds.upsert_agent(agent(AGENT_A, "01")).await.unwrap();
        assert!(ds.delete_entry(&e1.id).await.unwrap());
        assert_eq!(ds.current_revision().await.unwrap(), 5);

        let all = complete(ds.changes_since(0).await.unwrap());
        assert_eq!(
            all,
            vec![
                (1, ChangeKind::EntryUpserted, e1.id.clone()),
                (2, ChangeKind::EntryUpserted, e2.id.clone()),
                (3, ChangeKind::BundleUpdated, "example.org".to_owned()),
                (4, ChangeKind::AgentUpdated, AGENT_A.to_owned()),
                (5, ChangeKind::EntryDeleted, e1.id.clone()),
            ]
        );
        assert_eq!(
            complete(ds.changes_since(3).await.unwrap()),
            all[3..].to_vec()
        );
        assert_eq!(complete(ds.changes_since(5).await.unwrap()), vec![]);
        // A revision the datastore never handed out (restored from a backup).
        assert_eq!(ds.changes_since(6).await.unwrap(), ChangeSet::TooOld);
        assert_eq!(ds.changes_since(u64::MAX).await.unwrap(), ChangeSet::TooOld);
    }

    #[tokio::test]
    async fn reopen_keeps_entries_bundle_agents_and_revision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds.sqlite3");
        let ds = open_sqlite(&path).await.unwrap();
        let e = ds
            .create_entry(new_entry("w/1", AGENT_A, &["unix:uid:1"]))
            .await
            .unwrap();
        ds.set_bundle(bundle("example.org", 7)).await.unwrap();
        ds.upsert_agent(agent(AGENT_A, "0a")).await.unwrap();
        ds.close().await;
        drop(ds);

        let ds = open_sqlite(&path).await.unwrap();
        assert_eq!(ds.list_entries().await.unwrap(), vec![e]);
        assert_eq!(
            ds.get_bundle("example.org").await.unwrap(),
            Some(bundle("example.org", 7))
        );
        assert_eq!(
            ds.get_agent(&id(AGENT_A)).await.unwrap(),
            Some(agent(AGENT_A, "0a"))
        );
        assert_eq!(ds.current_revision().await.unwrap(), 3);
        // The next write continues the sequence.
        ds.set_bundle(bundle("example.org", 8)).await.unwrap();
        assert_eq!(ds.current_revision().await.unwrap(), 4);
    }

    #[tokio::test]
    async fn bundle_upsert() {
        let (_dir, ds) = open_temp().await;
        assert_eq!(ds.get_bundle("example.org").await.unwrap(), None);
        ds.set_bundle(bundle("example.org", 1)).await.unwrap();
        ds.set_bundle(bundle("partner.test", 3)).await.unwrap();
        ds.set_bundle(bundle("example.org", 2)).await.unwrap();
        assert_eq!(
            ds.get_bundle("example.org").await.unwrap(),
            Some(bundle("example.org", 2))
        );
        assert_eq!(
            ds.get_bundle("partner.test").await.unwrap(),
            Some(bundle("partner.test", 3))
        );
        assert_eq!(ds.current_revision().await.unwrap(), 3);
        let mut too_big = bundle("example.org", 0);
        too_big.sequence_number = u64::MAX;
        assert!(matches!(
            ds.set_bundle(too_big).await,
            Err(DatastoreError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn join_token_is_single_use() {
        let (_dir, ds) = open_temp().await;
        ds.create_join_token(token("tok1", 1, at(2_000)))
            .await
            .unwrap();
        // Only the hash is stored, never anything else of the secret.
        let stored: Vec<u8> =
            sqlx::query_scalar("SELECT secret_hash FROM join_tokens WHERE id = 'tok1'")
                .fetch_one(&ds.pool)
                .await
                .unwrap();
        assert_eq!(stored, vec![1; 32]);

        // Wrong secret: Invalid, and the token stays usable.
        assert_eq!(
            ds.consume_join_token("tok1", &[2; 32], at(1_000))
                .await
                .unwrap(),
            TokenOutcome::Invalid
        );
        assert_eq!(
            ds.consume_join_token("tok1", &[1; 32], at(1_000))
                .await
                .unwrap(),
            TokenOutcome::Consumed {
                alias: Some(id(ALIAS))
            }
        );
        // Second use: Invalid, like an unknown id.
        assert_eq!(
            ds.consume_join_token("tok1", &[1; 32], at(1_001))
                .await
                .unwrap(),
            TokenOutcome::Invalid
        );
        assert_eq!(
            ds.consume_join_token("nope", &[1; 32], at(1_001))
                .await
                .unwrap(),
            TokenOutcome::Invalid
        );
        // A used token that has expired since is still just Invalid.
        assert_eq!(
            ds.consume_join_token("tok1", &[1; 32], at(3_000))
                .await
                .unwrap(),
            TokenOutcome::Invalid
        );

        // A token without alias.
        let mut t2 = token("tok2", 3, at(2_000));
        t2.alias = None;
        ds.create_join_token(t2).await.unwrap();
        assert_eq!(
            ds.consume_join_token("tok2", &[3; 32], at(1_000))
                .await
                .unwrap(),
            TokenOutcome::Consumed { alias: None }
        );

        // Duplicate id.
        assert!(matches!(
            ds.create_join_token(token("tok1", 9, at(2_000))).await,
            Err(DatastoreError::Conflict(_))
        ));
        // Join tokens are not in the change feed.
        assert_eq!(ds.current_revision().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn expired_join_token_is_reported_and_deleted() {
        let (_dir, ds) = open_temp().await;
        ds.create_join_token(token("old", 1, at(1_000)))
            .await
            .unwrap();
        // Exactly at expiry it is expired.
        assert_eq!(
            ds.consume_join_token("old", &[1; 32], at(1_000))
                .await
                .unwrap(),
            TokenOutcome::Expired
        );
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM join_tokens")
            .fetch_one(&ds.pool)
            .await
            .unwrap();
        assert_eq!(left, 0);
        assert_eq!(
            ds.consume_join_token("old", &[1; 32], at(1_000))
                .await
                .unwrap(),
            TokenOutcome::Invalid
        );

        // Without the secret the caller learns nothing, but the useless token goes.
        ds.create_join_token(token("old2", 1, at(1_000)))
            .await
            .unwrap();
        assert_eq!(
            ds.consume_join_token("old2", &[7; 32], at(5_000))
                .await
                .unwrap(),
            TokenOutcome::Invalid
        );
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM join_tokens")
            .fetch_one(&ds.pool)
            .await
            .unwrap();
        assert_eq!(left, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn attestation_spends_the_token_and_records_the_agent_together() {
        let (_dir, ds) = open_temp().await;
        let ds: Arc<dyn Datastore> = Arc::new(ds);
        ds.create_join_token(token("tok", 7, at(2_000)))
            .await
            .unwrap();
        let mut fresh = agent("spiffe://example.org/tessera/agent/join_token/tok", "01");
        fresh.aliases.clear();
        // Wrong secret: nothing spent, nothing recorded.
        let outcome = ds
            .attest_with_join_token("tok", &[8; 32], at(1_000), fresh.clone())
            .await
            .unwrap();
        assert_eq!(outcome, TokenOutcome::Invalid);
        assert!(ds.list_agents().await.unwrap().is_empty());
        // Eight at once: one agent, carrying the token's alias.
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let ds = Arc::clone(&ds);
                let barrier = Arc::clone(&barrier);
                let mut candidate = fresh.clone();
                candidate.serial = format!("{:02x}", i + 1);
                tokio::spawn(async move {
                    barrier.wait().await;
                    ds.attest_with_join_token("tok", &[7; 32], at(1_000), candidate)
                        .await
                })
            })
            .collect();
        let mut consumed = 0;
        for task in tasks {
            if matches!(task.await.unwrap().unwrap(), TokenOutcome::Consumed { .. }) {
                consumed += 1;
            }
        }
        assert_eq!(consumed, 1);
        let agents = ds.list_agents().await.unwrap();
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].aliases, vec![id(ALIAS)]);
        // Expired: reported, deleted, no agent.
        ds.create_join_token(token("old", 9, at(500)))
            .await
            .unwrap();
        let mut late = fresh.clone();
        late.spiffe_id = id("spiffe://example.org/tessera/agent/join_token/old");
        let outcome = ds
            .attest_with_join_token("old", &[9; 32], at(1_000), late)
            .await
            .unwrap();
        assert_eq!(outcome, TokenOutcome::Expired);
        assert_eq!(ds.list_agents().await.unwrap().len(), 1);
    }

    fn changes_with_scope(set: ChangeSet) -> Vec<(ChangeKind, String, Vec<String>)> {
        match set {
            ChangeSet::Complete(changes) => changes
                .into_iter()
                .map(|c| (c.kind, c.object_id, c.scope))
                .collect(),
            ChangeSet::TooOld => panic!("expected a complete change set"),
        }
    }

    #[test]
    fn change_kinds_round_trip_through_storage() {
        let mut names = std::collections::BTreeSet::new();
        for kind in ChangeKind::ALL {
            assert_eq!(ChangeKind::from_stored(kind.as_str()), Some(kind));
            assert!(names.insert(kind.as_str()), "duplicate {}", kind.as_str());
        }
        assert_eq!(ChangeKind::from_stored("agent_unbanned"), None);
    }

    #[tokio::test]
    async fn banned_agent_cannot_be_recorded_renewed_or_attested_again() {
        let (_dir, ds) = open_temp().await;
        let agent_id = "spiffe://example.org/tessera/agent/join_token/tok";
        ds.upsert_agent(agent(agent_id, "01")).await.unwrap();
        ds.upsert_agent(agent(AGENT_B, "02")).await.unwrap();
        assert_eq!(ds.current_revision().await.unwrap(), 2);

        let banned = ds
            .ban_agent(&id(agent_id), at(1_800_000_000))
            .await
            .unwrap();
        let banned = banned.expect("the agent exists");
        assert_eq!(banned.banned_at, Some(at(1_800_000_000)));
        assert_eq!(
            changes_with_scope(ds.changes_since(2).await.unwrap()),
            vec![(
                ChangeKind::AgentBanned,
                agent_id.to_owned(),
                vec![agent_id.to_owned()]
            )]
        );
        // Banning again keeps the first ban and records nothing.
        let again = ds
            .ban_agent(&id(agent_id), at(1_900_000_000))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.banned_at, Some(at(1_800_000_000)));
        assert_eq!(ds.current_revision().await.unwrap(), 3);
        // Unknown agent: None, nothing recorded.
        assert_eq!(
            ds.ban_agent(
                &id("spiffe://example.org/tessera/agent/join_token/x"),
                at(1)
            )
            .await
            .unwrap(),
            None
        );
        assert_eq!(ds.current_revision().await.unwrap(), 3);
        // The ban shows in reads and survives a reopen.
        assert_eq!(
            ds.get_agent(&id(agent_id)).await.unwrap(),
            Some(banned.clone())
        );
        assert_eq!(
            ds.list_agents()
                .await
                .unwrap()
                .iter()
                .map(|a| a.banned_at.is_some())
                .collect::<Vec<_>>(),
            vec![false, true]
        );

        // Recording the ID again is refused, in the same statement, and writes nothing.
        let mut reattested = agent(agent_id, "03");
        reattested.banned_at = None;
        assert!(matches!(
            ds.upsert_agent(reattested.clone()).await,
            Err(DatastoreError::AgentBanned)
        ));
        assert_eq!(
            ds.get_agent(&id(agent_id)).await.unwrap(),
            Some(banned.clone())
        );
        assert_eq!(ds.current_revision().await.unwrap(), 3);
        // Renewal is refused.
        assert!(
            !ds.rotate_agent_serial(&id(agent_id), "01", "04", at(2_000_000_000))
                .await
                .unwrap()
        );
        // Attestation with a valid token is refused in the same transaction, and the
        // token is not spent.
        ds.create_join_token(token("tok", 7, at(2_000_000_000)))
            .await
            .unwrap();
        assert!(matches!(
            ds.attest_with_join_token("tok", &[7; 32], at(1_000), reattested)
                .await,
            Err(DatastoreError::AgentBanned)
        ));
        let used: Option<i64> =
            sqlx::query_scalar("SELECT used_at FROM join_tokens WHERE id = 'tok'")
                .fetch_one(&ds.pool)
                .await
                .unwrap();
        assert_eq!(used, None);
        assert_eq!(ds.get_agent(&id(agent_id)).await.unwrap(), Some(banned));
        assert_eq!(ds.current_revision().await.unwrap(), 3);
        // Other agents are unaffected.
        assert!(
            ds.rotate_agent_serial(&id(AGENT_B), "02", "05", at(2_000_000_000))
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn evicting_deletes_the_agent_and_lifts_a_ban() {
        let (_dir, ds) = open_temp().await;
        ds.upsert_agent(agent(AGENT_A, "01")).await.unwrap();
        ds.ban_agent(&id(AGENT_A), at(1_800_000_000)).await.unwrap();
        assert!(ds.evict_agent(&id(AGENT_A)).await.unwrap());
        assert_eq!(ds.get_agent(&id(AGENT_A)).await.unwrap(), None);
        assert_eq!(
            changes_with_scope(ds.changes_since(2).await.unwrap()),
            vec![(
                ChangeKind::AgentEvicted,
                AGENT_A.to_owned(),
                vec![AGENT_A.to_owned()]
            )]
        );
        // Nothing left to evict: false, nothing recorded.
        assert!(!ds.evict_agent(&id(AGENT_A)).await.unwrap());
        assert_eq!(ds.current_revision().await.unwrap(), 3);
        // The ID may attest again.
        ds.upsert_agent(agent(AGENT_A, "02")).await.unwrap();
        let back = ds.get_agent(&id(AGENT_A)).await.unwrap().unwrap();
        assert_eq!((back.serial.as_str(), back.banned_at), ("02", None));
    }

    fn soon(secs: u64) -> SystemTime {
        SystemTime::now() + Duration::from_secs(secs)
    }

    fn svid(spiffe_id: &str, serial: &str, expires_at: SystemTime) -> InstanceSvid {
        InstanceSvid {
            spiffe_id: id(spiffe_id),
            serial: serial.to_owned(),
            expires_at,
        }
    }

    /// Whole seconds, as stored.
    fn secs(t: SystemTime) -> SystemTime {
        at(t.duration_since(UNIX_EPOCH).unwrap().as_secs())
    }

    #[tokio::test]
    async fn revoking_an_identity_lists_its_serials_and_stops_recording() {
        let (_dir, ds) = open_temp().await;
        const X: &str = "spiffe://example.org/ai/bot/i-1";
        const Y: &str = "spiffe://example.org/ai/bot/i-2";
        let long = soon(7200);
        assert_eq!(
            ds.record_instance_svids(&[
                svid(X, "0a", soon(600)),
                svid(X, "0b", long),
                svid(Y, "0c", soon(600)),
            ])
            .await
            .unwrap(),
            vec![true, true, true]
        );
        // Recording serials is not a change agents sync.
        assert_eq!(ds.current_revision().await.unwrap(), 0);
        assert!(
            ds.revoked_serials(SystemTime::now())
                .await
                .unwrap()
                .is_empty()
        );

        let now = secs(SystemTime::now());
        let (revocation, created) = ds
            .revoke_identity(
                &id(X),
                now,
                now + Duration::from_secs(60),
                &[id(AGENT_A), id(ALIAS), id(AGENT_A)],
            )
            .await
            .unwrap();
        assert!(created);
        assert_eq!(
            revocation,
            Revocation {
                spiffe_id: id(X),
                revoked_at: now,
                // Never before the last listed certificate expires.
                expires_at: secs(long),
                // Sorted and deduplicated.
                scope: vec![id(ALIAS), id(AGENT_A)],
                serials: vec!["0a".to_owned(), "0b".to_owned()],
            }
        );
        assert_eq!(
            changes_with_scope(ds.changes_since(0).await.unwrap()),
            vec![(
                ChangeKind::IdentityRevoked,
                X.to_owned(),
                vec![ALIAS.to_owned(), AGENT_A.to_owned()]
            )]
        );
        // Idempotent: the revocation in force comes back, nothing is recorded.
        let (same, created) = ds
            .revoke_identity(
                &id(X),
                now + Duration::from_secs(5),
                now + Duration::from_secs(9),
                &[id(AGENT_B)],
            )
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(same, revocation);
        assert_eq!(ds.current_revision().await.unwrap(), 1);

        assert_eq!(
            ds.get_revocation(&id(X)).await.unwrap(),
            Some(revocation.clone())
        );
        assert_eq!(ds.get_revocation(&id(Y)).await.unwrap(), None);
        assert_eq!(
            ds.list_revocations().await.unwrap(),
            vec![revocation.clone()]
        );
        assert_eq!(
            ds.revoked_among(&[id(X), id(Y)], SystemTime::now())
                .await
                .unwrap(),
            [X.to_owned()].into_iter().collect()
        );
        assert!(
            ds.revoked_among(&[], SystemTime::now())
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            ds.revoked_serials(SystemTime::now()).await.unwrap(),
            vec![
                RevokedSerial {
                    serial: "0a".to_owned(),
                    revoked_at: now
                },
                RevokedSerial {
                    serial: "0b".to_owned(),
                    revoked_at: now
                },
            ]
        );
        // An SVID signed for the revoked ID meanwhile is withdrawn; others are kept.
        assert_eq!(
            ds.record_instance_svids(&[svid(Y, "0d", soon(600)), svid(X, "0e", soon(600))])
                .await
                .unwrap(),
            vec![true, false]
        );
        assert!(
            !ds.record_instance_svid(&id(X), "0f", soon(600))
                .await
                .unwrap()
        );
        assert!(
            ds.record_instance_svid(&id(Y), "10", soon(600))
                .await
                .unwrap()
        );
        assert_eq!(
            ds.get_revocation(&id(X)).await.unwrap().unwrap().serials,
            vec!["0a".to_owned(), "0b".to_owned()]
        );

        // Later: the short-lived serial has expired and leaves the CRL first; then the
        // revocation itself; pruning removes what expired.
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert_eq!(
            ds.revoked_serials(later).await.unwrap(),
            vec![RevokedSerial {
                serial: "0b".to_owned(),
                revoked_at: now
            }]
        );
        let after = long + Duration::from_secs(1);
        assert!(ds.revoked_serials(after).await.unwrap().is_empty());
        assert!(ds.revoked_among(&[id(X)], after).await.unwrap().is_empty());
        // 1 revocation + 6 serial rows (0a 0b 0c 0d 10, all expired by then).
        assert_eq!(ds.prune_revocations(after).await.unwrap(), 6);
        assert!(ds.list_revocations().await.unwrap().is_empty());
        assert_eq!(ds.prune_revocations(after).await.unwrap(), 0);
        // Pruning records nothing.
        assert_eq!(ds.current_revision().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn an_expired_revocation_is_replaced_by_a_new_one() {
        let (_dir, ds) = open_temp().await;
        const X: &str = "spiffe://example.org/ai/bot/i-1";
        let (first, created) = ds
            .revoke_identity(&id(X), at(1_000), at(2_000), &[id(AGENT_A)])
            .await
            .unwrap();
        assert!(created);
        // Still in force at 1_500: idempotent.
        let (_, created) = ds
            .revoke_identity(&id(X), at(1_500), at(3_000), &[id(AGENT_B)])
            .await
            .unwrap();
        assert!(!created);
        // Expired at 2_500 but not pruned: replaced, and recorded again.
        let (second, created) = ds
            .revoke_identity(&id(X), at(2_500), at(4_000), &[id(AGENT_B)])
            .await
            .unwrap();
        assert!(created);
        assert_ne!(first, second);
        assert_eq!(
            (second.revoked_at, second.expires_at),
            (at(2_500), at(4_000))
        );
        assert_eq!(second.scope, vec![id(AGENT_B)]);
        assert_eq!(ds.current_revision().await.unwrap(), 2);
    }

    /// SVIDs recorded while their identity is being revoked: whichever commits first,
    /// every SVID that was recorded (`true`) is listed for the CRL, and every one
    /// refused (`false`) left no row.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_signing_racing_a_revocation_never_escapes_the_crl() {
        let (_dir, ds) = open_temp().await;
        let ds = Arc::new(ds);
        const X: &str = "spiffe://example.org/ai/bot/i-1";
        for round in 0..5_u32 {
            let target = format!("{X}{round}");
            let barrier = Arc::new(tokio::sync::Barrier::new(9));
            let recorders: Vec<_> = (0..8_u32)
                .map(|i| {
                    let ds = Arc::clone(&ds);
                    let barrier = Arc::clone(&barrier);
                    let target = target.clone();
                    tokio::spawn(async move {
                        barrier.wait().await;
                        let mut outcomes = Vec::new();
                        for j in 0..4_u32 {
                            let serial = format!("{round:02x}{i:02x}{j:02x}");
                            let ok = ds
                                .record_instance_svid(&id(&target), &serial, soon(600))
                                .await
                                .unwrap();
                            outcomes.push((serial, ok));
                        }
                        outcomes
                    })
                })
                .collect();
            let revoker = {
                let ds = Arc::clone(&ds);
                let barrier = Arc::clone(&barrier);
                let target = target.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    tokio::task::yield_now().await;
                    let now = SystemTime::now();
                    ds.revoke_identity(
                        &id(&target),
                        now,
                        now + Duration::from_secs(60),
                        &[id(AGENT_A)],
                    )
                    .await
                    .unwrap()
                })
            };
            let mut outcomes = Vec::new();
            for recorder in recorders {
                outcomes.extend(recorder.await.unwrap());
            }
            let (revocation, created) = revoker.await.unwrap();
            assert!(created);
            let in_crl: Vec<String> = ds
                .revoked_serials(SystemTime::now())
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.serial)
                .collect();
            let stored = ds
                .get_revocation(&id(&target))
                .await
                .unwrap()
                .unwrap()
                .serials;
            for (serial, ok) in &outcomes {
                assert_eq!(
                    in_crl.contains(serial),
                    *ok,
                    "round {round} serial {serial}"
                );
                assert_eq!(
                    stored.contains(serial),
                    *ok,
                    "round {round} serial {serial}"
                );
            }
            // What the revocation listed when it was made stays listed.
            for serial in &revocation.serials {
                assert!(in_crl.contains(serial));
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_consumes_of_one_token_succeed_once() {
        let (_dir, ds) = open_temp().await;
        let ds: Arc<dyn Datastore> = Arc::new(ds);
        for round in 0..5 {
            let token_id = format!("race{round}");
            ds.create_join_token(token(&token_id, 4, at(2_000)))
                .await
                .unwrap();
            let barrier = Arc::new(tokio::sync::Barrier::new(8));
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let ds = Arc::clone(&ds);
                    let barrier = Arc::clone(&barrier);
                    let token_id = token_id.clone();
                    tokio::spawn(async move {
                        barrier.wait().await;
                        ds.consume_join_token(&token_id, &[4; 32], at(1_000)).await
                    })
                })
                .collect();
            let mut consumed = 0;
            for task in tasks {
                match task.await.unwrap().unwrap() {
                    TokenOutcome::Consumed { .. } => consumed += 1,
                    TokenOutcome::Invalid => {}
                    TokenOutcome::Expired => panic!("not expired"),
                }
            }
            assert_eq!(consumed, 1, "round {round}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_get_gapless_revisions() {
        let (_dir, ds) = open_temp().await;
        let ds: Arc<dyn Datastore> = Arc::new(ds);
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let ds = Arc::clone(&ds);
                tokio::spawn(async move {
                    let e = ds
                        .create_entry(new_entry(&format!("w/{i}"), AGENT_A, &["unix:uid:1"]))
                        .await?;
                    ds.upsert_agent(agent(&format!("{AGENT_A}{i}"), "01"))
                        .await?;
                    ds.delete_entry(&e.id).await.map(drop)
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let revs: Vec<u64> = complete(ds.changes_since(0).await.unwrap())
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(revs, (1..=48).collect::<Vec<_>>());
        assert_eq!(ds.current_revision().await.unwrap(), 48);
    }

    #[tokio::test]
    async fn agent_upsert_get_list() {
        let (_dir, ds) = open_temp().await;
        assert_eq!(ds.get_agent(&id(AGENT_A)).await.unwrap(), None);
        ds.upsert_agent(agent(AGENT_B, "0b")).await.unwrap();
        ds.upsert_agent(agent(AGENT_A, "0a")).await.unwrap();
        assert_eq!(
            ds.list_agents().await.unwrap(),
            vec![agent(AGENT_A, "0a"), agent(AGENT_B, "0b")]
        );

        // Re-attestation replaces the row but keeps the first attestation time.
        let mut again = agent(AGENT_A, "1a");
        again.first_attested_at = at(1_800_000_000);
        again.last_seen_at = at(1_800_000_000);
        again.aliases.clear();
        ds.upsert_agent(again.clone()).await.unwrap();
        let stored = ds.get_agent(&id(AGENT_A)).await.unwrap().unwrap();
        assert_eq!(stored.serial, "1a");
        assert_eq!(stored.aliases, vec![]);
        assert_eq!(stored.last_seen_at, at(1_800_000_000));
        assert_eq!(stored.first_attested_at, at(1_700_000_000));
        assert_eq!(ds.list_agents().await.unwrap().len(), 2);
        assert_eq!(ds.current_revision().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn rotate_and_confirm_agent_serial() {
        let (_dir, ds) = open_temp().await;
        let a = id(AGENT_A);
        ds.upsert_agent(agent(AGENT_A, "s1")).await.unwrap();
        let rev = ds.current_revision().await.unwrap();

        // Wrong serial, unknown agent: refused, nothing recorded.
        assert!(
            !ds.rotate_agent_serial(&a, "bogus", "s2", at(3_000_000_000))
                .await
                .unwrap()
        );
        assert!(
            !ds.rotate_agent_serial(&id(AGENT_B), "s1", "s2", at(3_000_000_000))
                .await
                .unwrap()
        );
        assert_eq!(ds.current_revision().await.unwrap(), rev);

        // Right serial.
        assert!(
            ds.rotate_agent_serial(&a, "s1", "s2", at(3_000_000_000))
                .await
                .unwrap()
        );
        let got = ds.get_agent(&a).await.unwrap().unwrap();
        assert_eq!(
            (got.serial.as_str(), got.previous_serial.as_deref()),
            ("s2", Some("s1"))
        );
        assert_eq!(got.expires_at, at(3_000_000_000));
        assert_eq!(ds.current_revision().await.unwrap(), rev + 1);

        // The agent crashed before using s2: renewing with s1 still works, and s1
        // (the serial it holds) stays the previous one.
        assert!(
            ds.rotate_agent_serial(&a, "s1", "s3", at(3_000_000_100))
                .await
                .unwrap()
        );
        let got = ds.get_agent(&a).await.unwrap().unwrap();
        assert_eq!(
            (got.serial.as_str(), got.previous_serial.as_deref()),
            ("s3", Some("s1"))
        );
        // s2 was never confirmed and is neither current nor previous any more.
        assert!(
            !ds.rotate_agent_serial(&a, "s2", "s9", at(3_000_000_100))
                .await
                .unwrap()
        );

        // Confirming a serial that is not current changes nothing.
        ds.confirm_agent_serial(&a, "s1").await.unwrap();
        assert_eq!(
            ds.get_agent(&a)
                .await
                .unwrap()
                .unwrap()
                .previous_serial
                .as_deref(),
            Some("s1")
        );
        let rev = ds.current_revision().await.unwrap();

        // s3 seen in use: s1 is forgotten and refused from now on.
        ds.confirm_agent_serial(&a, "s3").await.unwrap();
        let got = ds.get_agent(&a).await.unwrap().unwrap();
        assert_eq!((got.serial.as_str(), got.previous_serial), ("s3", None));
        assert_eq!(ds.current_revision().await.unwrap(), rev + 1);
        assert!(
            !ds.rotate_agent_serial(&a, "s1", "s4", at(3_000_000_200))
                .await
                .unwrap()
        );
        // Confirming again is a no-op.
        ds.confirm_agent_serial(&a, "s3").await.unwrap();
        assert_eq!(ds.current_revision().await.unwrap(), rev + 1);

        // Renewing with the current serial (unconfirmed or not) works.
        assert!(
            ds.rotate_agent_serial(&a, "s3", "s4", at(3_000_000_300))
                .await
                .unwrap()
        );
        let got = ds.get_agent(&a).await.unwrap().unwrap();
        assert_eq!(
            (got.serial.as_str(), got.previous_serial.as_deref()),
            ("s4", Some("s3"))
        );
        assert!(matches!(
            ds.rotate_agent_serial(&a, "s4", "s4", at(3_000_000_300))
                .await,
            Err(DatastoreError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn prune_changes_makes_old_revisions_too_old() {
        let (_dir, ds) = open_temp().await;
        for seq in 1..=10 {
            ds.set_bundle(bundle("example.org", seq)).await.unwrap();
        }
        assert_eq!(ds.prune_changes(4).await.unwrap(), 6);
        assert_eq!(ds.current_revision().await.unwrap(), 10);
        // Revisions 1..=6 are gone: a caller at 5 missed 6.
        assert_eq!(ds.changes_since(0).await.unwrap(), ChangeSet::TooOld);
        assert_eq!(ds.changes_since(5).await.unwrap(), ChangeSet::TooOld);
        let revs: Vec<u64> = complete(ds.changes_since(6).await.unwrap())
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(revs, vec![7, 8, 9, 10]);
        // Pruning again with the same bound does nothing.
        assert_eq!(ds.prune_changes(4).await.unwrap(), 0);

        // Prune everything: the revision does not go back, and is not reused.
        assert_eq!(ds.prune_changes(0).await.unwrap(), 4);
        assert_eq!(ds.current_revision().await.unwrap(), 10);
        assert_eq!(complete(ds.changes_since(10).await.unwrap()), vec![]);
        assert_eq!(ds.changes_since(9).await.unwrap(), ChangeSet::TooOld);
        ds.set_bundle(bundle("example.org", 11)).await.unwrap();
        assert_eq!(ds.current_revision().await.unwrap(), 11);
        assert_eq!(
            complete(ds.changes_since(10).await.unwrap()),
            vec![(11, ChangeKind::BundleUpdated, "example.org".to_owned())]
        );
    }

    #[tokio::test]
    async fn corrupt_rows_are_errors_not_panics() {
        let (_dir, ds) = open_temp().await;
        let e = ds
            .create_entry(new_entry("w/1", AGENT_A, &["unix:uid:1"]))
            .await
            .unwrap();
        sqlx::query("UPDATE entries SET spiffe_id = 'spiffe://Example.org/../x' WHERE id = ?")
            .bind(&e.id)
            .execute(&ds.pool)
            .await
            .unwrap();
        assert!(matches!(
            ds.get_entry(&e.id).await,
            Err(DatastoreError::Corrupt(_))
        ));
        assert!(matches!(
            ds.list_entries().await,
            Err(DatastoreError::Corrupt(_))
        ));

        sqlx::query("UPDATE entries SET spiffe_id = 'spiffe://example.org/w/1', selectors = '[\"nocolon\"]'")
            .execute(&ds.pool)
            .await
            .unwrap();
        let err = ds.get_entry(&e.id).await.unwrap_err();
        assert!(matches!(err, DatastoreError::Corrupt(_)));
        assert!(
            !err.to_string().contains("nocolon"),
            "raw selector value leaked: {err}"
        );

        ds.upsert_agent(agent(AGENT_A, "01")).await.unwrap();
        sqlx::query("UPDATE agents SET aliases = 'not json'")
            .execute(&ds.pool)
            .await
            .unwrap();
        assert!(matches!(
            ds.get_agent(&id(AGENT_A)).await,
            Err(DatastoreError::Corrupt(_))
        ));
        sqlx::query("UPDATE agents SET aliases = '[]', spiffe_id = 'http://x'")
            .execute(&ds.pool)
            .await
            .unwrap();
        assert!(matches!(
            ds.list_agents().await,
            Err(DatastoreError::Corrupt(_))
        ));

        ds.create_join_token(token("tok", 1, at(2_000)))
            .await
            .unwrap();
        sqlx::query("UPDATE join_tokens SET alias = 'nope'")
            .execute(&ds.pool)
            .await
            .unwrap();
        assert!(matches!(
            ds.consume_join_token("tok", &[1; 32], at(1_000)).await,
            Err(DatastoreError::Corrupt(_))
        ));

        sqlx::query("UPDATE entries SET selectors = '[]', jwt_audiences = '[1]'")
            .execute(&ds.pool)
            .await
            .unwrap();
        assert!(matches!(
            ds.get_entry(&e.id).await,
            Err(DatastoreError::Corrupt(_))
        ));
        sqlx::query("UPDATE entries SET jwt_audiences = '[]'")
            .execute(&ds.pool)
            .await
            .unwrap();
        ds.get_entry(&e.id).await.unwrap().unwrap();

        ds.set_bundle(bundle("example.org", 1)).await.unwrap();
        for bad in [
            "not json",
            r#"[{"kid":"k","public_key":"zz","expires_at":null}]"#,
            r#"[{"kid":"k","public_key":"30","expires_at":-5}]"#,
            r#"[{"kid":"k","expires_at":null}]"#,
        ] {
            sqlx::query("UPDATE bundles SET jwt_authorities = ?")
                .bind(bad)
                .execute(&ds.pool)
                .await
                .unwrap();
            assert!(
                matches!(
                    ds.get_bundle("example.org").await,
                    Err(DatastoreError::Corrupt(_))
                ),
                "{bad}"
            );
        }

        sqlx::query("UPDATE changes SET kind = 'mystery' WHERE revision = 1")
            .execute(&ds.pool)
            .await
            .unwrap();
        assert!(matches!(
            ds.changes_since(0).await,
            Err(DatastoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn jwt_fields_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds.sqlite3");
        let ds = open_sqlite(&path).await.unwrap();
        let mut e = new_entry("ai/bot", AGENT_A, &["unix:uid:1"]);
        e.jwt_svid_ttl = Some(Duration::from_secs(900));
        e.jwt_audiences = vec![
            "spiffe://example.org/db".to_owned(),
            "https://api.example.org".to_owned(),
            "spiffe://example.org/db".to_owned(),
            "aud with spaces and ünïcödé".to_owned(),
        ];
        e.jwt_multi_audience = true;
        let created = ds.create_entry(e).await.unwrap();
        // Stored (and returned) sorted and deduplicated.
        assert_eq!(
            created.jwt_audiences,
            vec![
                "aud with spaces and ünïcödé".to_owned(),
                "https://api.example.org".to_owned(),
                "spiffe://example.org/db".to_owned(),
            ]
        );
        assert_eq!(created.jwt_svid_ttl, Some(Duration::from_secs(900)));
        assert!(created.jwt_multi_audience);
        assert_eq!(
            ds.get_entry(&created.id).await.unwrap(),
            Some(created.clone())
        );

        // Defaults round-trip too.
        let mut bare = new_entry("ai/bare", AGENT_A, &["unix:uid:2"]);
        bare.jwt_svid_ttl = None;
        bare.jwt_audiences.clear();
        let bare = ds.create_entry(bare).await.unwrap();
        assert_eq!((bare.jwt_svid_ttl, bare.jwt_multi_audience), (None, false));
        assert!(bare.jwt_audiences.is_empty());
        ds.close().await;
        drop(ds);

        let ds = SqliteDatastore::open(&path).await.unwrap();
        assert_eq!(
            ds.get_entry(&created.id).await.unwrap(),
            Some(created.clone())
        );
        assert_eq!(ds.get_entry(&bare.id).await.unwrap(), Some(bare.clone()));
        assert_eq!(
            ds.list_entries_by_parent(&[id(AGENT_A)])
                .await
                .unwrap()
                .len(),
            2
        );
        // The storage format the migration documents.
        let (ttl, audiences, multi): (Option<i64>, String, i64) = sqlx::query_as(
            "SELECT jwt_svid_ttl_secs, jwt_audiences, jwt_multi_audience FROM entries \
             WHERE id = ?",
        )
        .bind(&created.id)
        .fetch_one(&ds.pool)
        .await
        .unwrap();
        assert_eq!(ttl, Some(900));
        assert_eq!(
            serde_json::from_str::<Vec<String>>(&audiences).unwrap(),
            created.jwt_audiences
        );
        assert_eq!(multi, 1);
    }

    #[tokio::test]
    async fn invalid_jwt_fields_are_refused() {
        let (_dir, ds) = open_temp().await;
        let with = |f: &dyn Fn(&mut NewEntry)| {
            let mut e = new_entry("ai/bot", AGENT_A, &["unix:uid:1"]);
            f(&mut e);
            e
        };
        let bad = [
            with(&|e| e.jwt_svid_ttl = Some(Duration::from_millis(1500))),
            with(&|e| e.jwt_svid_ttl = Some(Duration::from_secs(u64::MAX))),
            with(&|e| e.jwt_audiences.push(String::new())),
            with(&|e| e.jwt_audiences.push("x".repeat(MAX_JWT_AUDIENCE_LEN + 1))),
            // 129 two-byte characters: short in characters, too long in bytes.
            with(&|e| {
                e.jwt_audiences
                    .push("é".repeat(MAX_JWT_AUDIENCE_LEN / 2 + 1))
            }),
            with(&|e| e.jwt_audiences.push("secret\naudience".to_owned())),
            with(&|e| e.jwt_audiences.push("secret\u{7f}audience".to_owned())),
            with(&|e| e.jwt_audiences.push("secret\u{85}audience".to_owned())),
            with(&|e| {
                e.jwt_audiences = (0..=MAX_JWT_AUDIENCES).map(|i| format!("a{i}")).collect();
            }),
        ];
        let existing = ds
            .create_entry(new_entry("ai/other", AGENT_A, &["unix:uid:9"]))
            .await
            .unwrap();
        for e in bad {
            let err = ds.create_entry(e.clone()).await.unwrap_err();
            assert!(
                matches!(err, DatastoreError::InvalidArgument(_)),
                "{e:?}: {err:?}"
            );
            assert!(!err.to_string().contains("secret"), "value leaked: {err}");
            let err = ds.update_entry(&existing.id, e.clone()).await.unwrap_err();
            assert!(
                matches!(err, DatastoreError::InvalidArgument(_)),
                "{e:?}: {err:?}"
            );
        }
        assert_eq!(ds.current_revision().await.unwrap(), 1);
        assert_eq!(ds.get_entry(&existing.id).await.unwrap(), Some(existing));

        // The limits themselves are fine, duplicates count once.
        let ok = with(&|e| {
            e.jwt_audiences = (0..MAX_JWT_AUDIENCES)
                .map(|i| format!("{i:0>width$}", width = MAX_JWT_AUDIENCE_LEN))
                .chain((0..5).map(|i| format!("{i:0>width$}", width = MAX_JWT_AUDIENCE_LEN)))
                .collect();
        });
        let created = ds.create_entry(ok).await.unwrap();
        assert_eq!(created.jwt_audiences.len(), MAX_JWT_AUDIENCES);
        assert!(created.jwt_audiences.is_sorted());
    }

    #[tokio::test]
    async fn update_entry_replaces_every_field() {
        let (_dir, ds) = open_temp().await;
        let a = ds
            .create_entry(new_entry("ai/bot", AGENT_A, &["unix:uid:1"]))
            .await
            .unwrap();
        let b = ds
            .create_entry(new_entry("ai/writer", AGENT_A, &["unix:uid:2"]))
            .await
            .unwrap();
        assert_eq!(ds.current_revision().await.unwrap(), 2);

        let new = NewEntry {
            spiffe_id: id("spiffe://example.org/ai/renamed").into(),
            parent_id: id(AGENT_B),
            selectors: vec![
                Selector::parse("unix:uid:3").unwrap(),
                Selector::parse("unix:gid:4").unwrap(),
            ],
            x509_svid_ttl: None,
            jwt_svid_ttl: Some(Duration::from_secs(30)),
            jwt_audiences: vec!["b".to_owned(), "a".to_owned(), "b".to_owned()],
            jwt_multi_audience: true,
            dns_names: vec![],
            hint: "renamed".to_owned(),
            federates_with: Vec::new(),
        };
        let updated = ds.update_entry(&a.id, new.clone()).await.unwrap().unwrap();
        assert_eq!(
            updated,
            RegistrationEntry {
                id: a.id.clone(),
                spiffe_id: new.spiffe_id.clone(),
                parent_id: new.parent_id.clone(),
                selectors: new.selectors.clone(),
                x509_svid_ttl: None,
                jwt_svid_ttl: Some(Duration::from_secs(30)),
                jwt_audiences: vec!["a".to_owned(), "b".to_owned()],
                jwt_multi_audience: true,
                dns_names: vec![],
                hint: "renamed".to_owned(),
                federates_with: Vec::new(),
                created_revision: a.created_revision,
                revision: 3,
            }
        );
        assert_eq!(ds.current_revision().await.unwrap(), 3);
        assert_eq!(ds.get_entry(&a.id).await.unwrap(), Some(updated.clone()));
        assert_eq!(
            complete(ds.changes_since(2).await.unwrap()),
            vec![(3, ChangeKind::EntryUpserted, a.id.clone())]
        );
        // The entry moved to its new parent.
        assert_eq!(
            ds.list_entries_by_parent(&[id(AGENT_B)]).await.unwrap(),
            vec![updated.clone()]
        );
        assert_eq!(
            ds.list_entries_by_parent(&[id(AGENT_A)]).await.unwrap(),
            vec![b.clone()]
        );
        // Its old similarity key is free again.
        let again = ds
            .create_entry(new_entry("ai/bot", AGENT_A, &["unix:uid:1"]))
            .await
            .unwrap();
        assert_eq!(again.revision, 4);

        // Updating to its own key (same content) is no conflict and still a change.
        let same = ds.update_entry(&a.id, new.clone()).await.unwrap().unwrap();
        assert_eq!(
            (same.created_revision, same.revision),
            (a.created_revision, 5)
        );
        // Same key as another entry (selectors in another order): Conflict, nothing
        // recorded or changed.
        let mut clash = new_entry("ai/writer", AGENT_A, &["unix:uid:2", "unix:uid:2"]);
        clash.hint = "clash".to_owned();
        let err = ds.update_entry(&a.id, clash).await.unwrap_err();
        assert!(matches!(err, DatastoreError::Conflict(_)), "{err:?}");
        assert_eq!(ds.current_revision().await.unwrap(), 5);
        assert_eq!(ds.get_entry(&a.id).await.unwrap(), Some(same));
        assert_eq!(ds.get_entry(&b.id).await.unwrap(), Some(b));

        // Unknown id: None, no change recorded, the revision is not consumed.
        assert_eq!(
            ds.update_entry("0123456789abcdef0123456789abcdef", new)
                .await
                .unwrap(),
            None
        );
        assert_eq!(ds.current_revision().await.unwrap(), 5);
        let next = ds
            .create_entry(new_entry("ai/next", AGENT_A, &["unix:uid:8"]))
            .await
            .unwrap();
        assert_eq!(next.revision, 6);
    }

    #[tokio::test]
    async fn bundle_jwt_authorities_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds.sqlite3");
        let ds = SqliteDatastore::open(&path).await.unwrap();
        let mut b = bundle("example.org", 1);
        b.jwt_authorities.push(StoredJwtAuthority {
            kid: "epoch".to_owned(),
            public_key: vec![],
            expires_at: Some(UNIX_EPOCH),
        });
        ds.set_bundle(b.clone()).await.unwrap();
        assert_eq!(ds.get_bundle("example.org").await.unwrap(), Some(b.clone()));

        let stored: String =
            sqlx::query_scalar("SELECT jwt_authorities FROM bundles WHERE trust_domain = ?")
                .bind("example.org")
                .fetch_one(&ds.pool)
                .await
                .unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&stored).unwrap(),
            serde_json::json!([
                {"kid": "key-1", "public_key": "305901", "expires_at": null},
                {"kid": "old", "public_key": "302a", "expires_at": 1_900_000_000},
                {"kid": "epoch", "public_key": "", "expires_at": 0},
            ])
        );

        // Replacing the bundle replaces its JWT authorities, also with none.
        let mut none = bundle("example.org", 2);
        none.jwt_authorities.clear();
        ds.set_bundle(none.clone()).await.unwrap();
        assert_eq!(ds.get_bundle("example.org").await.unwrap(), Some(none));
        ds.set_bundle(b.clone()).await.unwrap();

        // An expiry before 1970 cannot be stored.
        let mut bad = bundle("example.org", 9);
        bad.jwt_authorities[0].expires_at = Some(UNIX_EPOCH - Duration::from_secs(1));
        assert!(matches!(
            ds.set_bundle(bad).await,
            Err(DatastoreError::InvalidArgument(_))
        ));
        assert_eq!(ds.current_revision().await.unwrap(), 3);
        ds.close().await;

        let ds = open_sqlite(&path).await.unwrap();
        assert_eq!(ds.get_bundle("example.org").await.unwrap(), Some(b));
    }

    #[tokio::test]
    async fn migration_2_keeps_rows_of_migration_1_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds.sqlite3");

        // A database as a release with only migration 1 left it.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .unwrap();
        migrator_of(&MIGRATIONS[..1]).run(&pool).await.unwrap();
        let entry_id = "00112233445566778899aabbccddeeff";
        sqlx::query(
            "INSERT INTO changes (kind, object_id, recorded_at) VALUES \
             ('entry_upserted', ?, 1), ('bundle_updated', 'example.org', 1)",
        )
        .bind(entry_id)
        .execute(&pool)
        .await
        .unwrap();
        let old = new_entry("w/old", AGENT_A, &["unix:uid:1"]);
        sqlx::query(
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors, similarity_key, \
             x509_svid_ttl_secs, dns_names, hint, created_revision, revision) \
             VALUES (?, ?, ?, '[\"unix:uid:1\"]', ?, 300, '[\"bot.example.org\"]', \
             'internal', 1, 1)",
        )
        .bind(entry_id)
        .bind(old.spiffe_id.as_str())
        .bind(old.parent_id.as_str())
        .bind(similarity_key(&old.spiffe_id, &old.parent_id, &old.selectors).unwrap())
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO bundles (trust_domain, x509_authorities, sequence_number, revision) \
             VALUES ('example.org', '[\"3003\"]', 7, 2)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let ds = SqliteDatastore::open(&path).await.unwrap();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&ds.pool)
                .await
                .unwrap();
        assert_eq!(versions, vec![1, 2, 3, 4, 5]);
        let expected = RegistrationEntry {
            id: entry_id.to_owned(),
            spiffe_id: old.spiffe_id.clone(),
            parent_id: old.parent_id.clone(),
            selectors: old.selectors.clone(),
            x509_svid_ttl: Some(Duration::from_secs(300)),
            jwt_svid_ttl: None,
            jwt_audiences: vec![],
            jwt_multi_audience: false,
            dns_names: vec!["bot.example.org".to_owned()],
            hint: "internal".to_owned(),
            federates_with: Vec::new(),
            created_revision: 1,
            revision: 1,
        };
        assert_eq!(
            ds.get_entry(entry_id).await.unwrap(),
            Some(expected.clone())
        );
        assert_eq!(ds.list_entries().await.unwrap(), vec![expected]);
        assert_eq!(
            ds.get_bundle("example.org").await.unwrap(),
            Some(StoredBundle {
                trust_domain: "example.org".to_owned(),
                x509_authorities: vec![vec![0x30, 0x03]],
                jwt_authorities: vec![],
                sequence_number: 7,
            })
        );
        assert_eq!(ds.current_revision().await.unwrap(), 2);

        // The old similarity key still guards against duplicates, and the old row can
        // be updated with JWT fields.
        assert!(matches!(
            ds.create_entry(old.clone()).await,
            Err(DatastoreError::Conflict(_))
        ));
        let updated = ds.update_entry(entry_id, old).await.unwrap().unwrap();
        assert_eq!((updated.created_revision, updated.revision), (1, 3));
        assert_eq!(updated.jwt_svid_ttl, Some(Duration::from_secs(120)));
        assert_eq!(ds.get_entry(entry_id).await.unwrap(), Some(updated));
    }
}
