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
//! gaps. (The PostgreSQL implementation gets the same property from an advisory lock
//! taken first in each writing transaction; see `postgres.rs`.)
//!
//! Migrations live in `server/migrations/sqlite/` and are embedded with `include_str!`
//! (sqlx's `migrate!` macro needs the `macros` feature, which the workspace does not
//! enable); a test checks the embedded list matches the directory.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use sqlx::error::DatabaseError;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteError, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use tessera_plugin_sdk::{RegistrationEntry, SpiffeId};

use super::rows::{
    BoolColumn, FeedBounds, agent_from_row, bundle_from_row, change_from_row,
    contribution_from_row, entry_from_row, relationship_from_row, revocation_from_row,
    revocations_with_serials, revoked_serials, select_agents, select_bundles, select_changes,
    select_contributions, select_entries, select_relationships, select_revocations, token_alias,
    unconsumable_outcome,
};
use super::{
    AgentColumns, AttestedAgent, AuthorityContribution, BundleColumns, ChangeKind, ChangeSet,
    ContributionColumns, Datastore, DatastoreError, EntryColumns, FederationRelationship,
    InstanceSvid, InstanceSvidColumns, NewEntry, NewJoinToken, Revocation, RevocationColumns,
    RevokedSerial, StoredBundle, TokenOutcome, add_alias, check_new_serial, endpoint_id_column,
    federation_conflict, join_token_conflict, json_list, migrator_of, new_entry_id, now_unix_secs,
    revision_to_i64, scope_json, similar_entry_conflict, stored_bool, stored_u64, to_unix_secs,
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

/// Maps an error SQLite reported (other than a unique violation, which
/// `From<sqlx::Error> for DatastoreError` maps for every backend) by its primary
/// result code (<https://www.sqlite.org/rescode.html>).
pub(super) fn database_error(db: Box<dyn DatabaseError>) -> DatastoreError {
    let primary = db
        .try_downcast_ref::<SqliteError>()
        .and_then(|s| s.code())
        .and_then(|c| c.parse::<i32>().ok())
        .map(|c| c & 0xff);
    match primary {
        // BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL
        Some(5 | 6 | 7 | 8 | 10 | 13 | 14 | 15) => DatastoreError::Unavailable(db.into()),
        // CORRUPT, NOTADB
        Some(11 | 26) => DatastoreError::Corrupt(format!("database file: {}", db.message())),
        _ => DatastoreError::Internal(db.into()),
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
    let revision: i64 = sqlx::query_scalar(
        "INSERT INTO changes (kind, object_id, recorded_at, scope) VALUES (?, ?, ?, ?) \
         RETURNING revision",
    )
    .bind(kind.as_str())
    .bind(object_id)
    .bind(now_unix_secs())
    .bind(scope_json(scope)?)
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
    let columns = AgentColumns::new(agent)?;

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
    .bind(columns.expires_at)
    .bind(&columns.aliases)
    .bind(columns.first_attested_at)
    .bind(columns.last_seen_at)
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

/// The contributions to `trust_domain`'s bundle, ordered by server id.
async fn contributions_in(
    conn: &mut SqliteConnection,
    trust_domain: &str,
) -> Result<Vec<AuthorityContribution>, DatastoreError> {
    let rows = sqlx::query(select_contributions!(
        "WHERE trust_domain = ? ORDER BY server_id"
    ))
    .bind(trust_domain)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| contribution_from_row(row, trust_domain))
        .collect()
}

/// Stores a bundle inside a write transaction, recording [`ChangeKind::BundleUpdated`].
async fn store_bundle_in(
    conn: &mut SqliteConnection,
    trust_domain: &str,
    bundle: &BundleColumns,
) -> Result<(), DatastoreError> {
    let revision = record_change(conn, ChangeKind::BundleUpdated, trust_domain, &[]).await?;
    sqlx::query(
        "INSERT INTO bundles (trust_domain, x509_authorities, jwt_authorities, \
         sequence_number, revision) VALUES (?, ?, ?, ?, ?) \
         ON CONFLICT (trust_domain) DO UPDATE SET \
           x509_authorities = excluded.x509_authorities, \
           jwt_authorities = excluded.jwt_authorities, \
           sequence_number = excluded.sequence_number, \
           revision = excluded.revision",
    )
    .bind(trust_domain)
    .bind(&bundle.authorities.x509_authorities)
    .bind(&bundle.authorities.jwt_authorities)
    .bind(bundle.sequence_number)
    .bind(revision_to_i64(revision)?)
    .execute(&mut *conn)
    .await?;
    Ok(())
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

/// The revocation of `spiffe_id` with its serials, read inside `conn`'s transaction.
async fn revocation_in(
    conn: &mut SqliteConnection,
    spiffe_id: &str,
) -> Result<Option<Revocation>, DatastoreError> {
    let Some(row) = sqlx::query(select_revocations!("WHERE spiffe_id = ?"))
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

/// Reads the bounds of the change feed inside `conn`'s transaction.
async fn feed_bounds_in(conn: &mut SqliteConnection) -> Result<FeedBounds, DatastoreError> {
    let current = current_revision_in(&mut *conn).await?;
    let pruned_through: i64 =
        sqlx::query_scalar("SELECT pruned_through FROM change_feed WHERE id = 1")
            .fetch_one(conn)
            .await?;
    FeedBounds::new(current, pruned_through)
}

/// What a caller learns of a join token it could not consume, consuming nothing: an
/// expired, unused token is useless to anyone, so it is deleted, and "expired" is said
/// only to a caller who holds its secret; anything else is
/// [`TokenOutcome::Invalid`].
async fn unconsumable_token(
    conn: &mut SqliteConnection,
    id: &str,
    secret_hash: &[u8; 32],
    now: i64,
) -> Result<TokenOutcome, DatastoreError> {
    let expired_hash: Option<Vec<u8>> = sqlx::query_scalar(
        "DELETE FROM join_tokens WHERE id = ? AND used_at IS NULL AND expires_at <= ? \
         RETURNING secret_hash",
    )
    .bind(id)
    .bind(now)
    .fetch_optional(conn)
    .await?;
    Ok(unconsumable_outcome(expired_hash, secret_hash))
}

/// SQLite's STRICT tables have no boolean type: a flag is an INTEGER, 0 or 1.
impl BoolColumn for Sqlite {
    fn get_bool(row: &SqliteRow, col: &str, what: &str) -> Result<bool, DatastoreError> {
        stored_bool(row.try_get(col)?, what)
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
        result.map_err(join_token_conflict)?;
        Ok(())
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
            let alias = token_alias(id, alias)?;
            return Ok(TokenOutcome::Consumed { alias });
        }
        let mut conn = self.pool.acquire().await?;
        unconsumable_token(&mut conn, id, secret_hash, now).await
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
            // Not consumable: the answer (and expired-token cleanup) of
            // `consume_join_token`, in this transaction. Never by trying to consume
            // again: a token that became consumable meanwhile would be spent without
            // an agent recorded.
            let outcome = unconsumable_token(&mut tx, id, secret_hash, now_secs).await?;
            tx.commit().await?;
            return Ok(outcome);
        };
        let alias = token_alias(id, alias)?;
        add_alias(&mut agent, alias.as_ref());
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
        check_new_serial(current_serial, new_serial)?;
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
        sqlx::query(select_bundles!("WHERE trust_domain = ?"))
            .bind(trust_domain)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(bundle_from_row)
            .transpose()
    }

    async fn set_bundle(&self, bundle: StoredBundle) -> Result<(), DatastoreError> {
        let columns = BundleColumns::new(&bundle)?;

        let mut tx = self.begin_write().await?;
        store_bundle_in(&mut tx, &bundle.trust_domain, &columns).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn publish_authorities(
        &self,
        contribution: AuthorityContribution,
        now: SystemTime,
    ) -> Result<bool, DatastoreError> {
        let columns = ContributionColumns::new(&contribution, now)?;
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
        .bind(&columns.authorities.x509_authorities)
        .bind(&columns.authorities.jwt_authorities)
        .bind(columns.expires_at)
        .bind(columns.now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM authority_contributions \
             WHERE trust_domain = ? AND server_id <> ? AND expires_at <= ?",
        )
        .bind(td)
        .bind(&contribution.server_id)
        .bind(columns.now)
        .execute(&mut *tx)
        .await?;
        let contributions = contributions_in(&mut tx, td).await?;
        let stored = sqlx::query(select_bundles!("WHERE trust_domain = ?"))
            .bind(td)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(bundle_from_row)
            .transpose()?;
        let Some(rebuilt) = BundleColumns::rebuilt(stored, &contributions)? else {
            tx.commit().await?;
            return Ok(false);
        };
        store_bundle_in(&mut tx, td, &rebuilt).await?;
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
        sqlx::query(select_bundles!("ORDER BY trust_domain"))
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
        inserted.map_err(|e| federation_conflict(e, &td))?;
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
        sqlx::query(select_relationships!("WHERE trust_domain = ?"))
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
        sqlx::query(select_relationships!("ORDER BY trust_domain"))
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
        let columns = RevocationColumns::new(revoked_at, expires_at, scope)?;

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
        .bind(columns.revoked_at)
        .bind(columns.expires_at)
        .bind(&columns.scope_json)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let created = written > 0;
        if created {
            record_change(
                &mut tx,
                ChangeKind::IdentityRevoked,
                spiffe_id.as_str(),
                &columns.scope,
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
        let rows = sqlx::query(select_revocations!("ORDER BY spiffe_id"))
            .fetch_all(&mut *tx)
            .await?;
        let serials: Vec<(String, String)> = sqlx::query_as(
            "SELECT s.spiffe_id, s.serial FROM instance_svids s \
             JOIN revocations r ON r.spiffe_id = s.spiffe_id ORDER BY s.serial",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        revocations_with_serials(&rows, serials)
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
        let columns = InstanceSvidColumns::new(svids)?;
        let serials_json = json_list(&columns.serials)?;

        // Insert first, then take back what a revocation in force covers, all under the
        // write lock: a concurrent `revoke_identity` runs wholly before (and is seen
        // here) or wholly after (and lists the serials).
        let mut tx = self.begin_write().await?;
        let rows = columns
            .serials
            .iter()
            .zip(&columns.spiffe_ids)
            .zip(&columns.expires_at);
        for ((serial, spiffe_id), expires_at) in rows {
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
        Ok(columns.recorded(&withdrawn))
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
        revoked_serials(rows)
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
        let bounds = feed_bounds_in(&mut tx).await?;
        if bounds.lacks_changes_after(revision) {
            tx.rollback().await?;
            return Ok(ChangeSet::TooOld);
        }
        let rows = sqlx::query(select_changes!("WHERE revision > ? ORDER BY revision"))
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
        let Some(cutoff) = feed_bounds_in(&mut tx).await?.prune_cutoff(keep)? else {
            tx.rollback().await?;
            return Ok(0);
        };
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
    //! SQLite's own tests: file mode, pragmas, and upgrades from older schemas. Its
    //! behaviour as a [`Datastore`] is tested by the suite (`super::super::suite`),
    //! which runs against both implementations.

    use super::super::suite::{AGENT_A, assert_embedded_migrations_match, new_entry};
    use super::super::{open_sqlite, similarity_key};
    use super::*;

    #[test]
    fn embedded_migrations_match_the_directory() {
        assert_embedded_migrations_match("sqlite", MIGRATIONS);
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
