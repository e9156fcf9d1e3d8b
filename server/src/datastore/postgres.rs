//! The PostgreSQL implementation of [`Datastore`]: one database that several servers of
//! a trust domain share (DESIGN.md §5).
//!
//! # The change feed in commit order
//!
//! A reader that has seen revision N must have seen every revision below it, or it
//! skips a change for ever. PostgreSQL sequences are not transactional: with one, a
//! transaction holding revision 10 could commit after one holding 11. So every
//! transaction that may record a change (and every other multi-statement write, as in
//! the SQLite implementation) starts with `pg_advisory_xact_lock` on one key, the
//! change-feed lock, and only then reads or writes anything:
//!
//! - writers are serialised across every server sharing the database, and a revision
//!   is assigned as one more than the current revision while the lock is held (no
//!   sequence, so a rolled back write leaves no gap either);
//! - PostgreSQL releases a transaction's locks after its commit is visible, so the
//!   next holder commits later: commit order is revision order, and a snapshot that
//!   contains revision N contains every revision below it;
//! - under READ COMMITTED each statement after the lock sees every earlier holder's
//!   commit, so read-modify-write transactions (`publish_authorities`, the revocation
//!   and instance-serial pair) behave as in SQLite's single-writer model.
//!
//! Concurrency-critical writes that record no change stay single statements outside
//! the lock (join token consumption: `UPDATE ... WHERE used_at IS NULL RETURNING`,
//! where PostgreSQL's row lock and re-check give exactly one winner). Multi-statement
//! reads run in one `REPEATABLE READ READ ONLY` transaction (one snapshot). The lock
//! key lives in the two-`int4` key space of advisory locks, which never overlaps the
//! single-`bigint` key sqlx's migrator locks while it migrates.
//!
//! # Notifications
//!
//! An `AFTER INSERT` trigger on `changes` (migration 0001) calls
//! `pg_notify('tessera_changes', revision)`, which PostgreSQL delivers at commit. A
//! background task owns a [`PgListener`] on its own one-connection pool and bumps the
//! [`watch`] value of [`Datastore::change_notifications`] on each notification, and
//! once more each time it has (re)subscribed after losing the connection (notifications
//! sent meanwhile are lost), retrying with a backoff from 100 ms up to 5 s while the
//! database is down. It also subscribes again, on a new connection, when a datastore
//! call went unanswered (see below): its own connection may be half-open too.
//! [`Datastore::close`] and dropping the datastore stop the task.
//!
//! # Connections
//!
//! `connection_string` is a `postgres://` URL or libpq's `key=value` form (translated
//! to the URL form sqlx parses, so `~/.pgpass` applies to both). TLS uses rustls with
//! aws-lc-rs and the Mozilla roots (`sslmode=verify-full`, `sslrootcert=...` for a
//! private CA); as with libpq, `prefer` and `require` do not verify the server, and
//! opening warns when a server on another host is reached that way (a man in the
//! middle could strip TLS and ask for the password in clear text). Each connection
//! gets `lock_timeout` (10 s), `statement_timeout` (20 s) and
//! `idle_in_transaction_session_timeout` (60 s) unless the connection string sets them
//! (in `options`: `-c name=value`, `-cname=value` or `--name=value`), so a stuck server
//! cannot hold the change-feed lock for long; waiting longer fails `Unavailable`.
//!
//! Those bound a server that answers. One that vanished without a word (power loss, a
//! partition, a failover to another address) leaves half-open connections: no RST
//! comes, sqlx 0.9 sets no TCP keepalive (it opens the socket itself and offers no
//! option or hook for it) and no timeout of its own, so a query sent on one waits for
//! ever. So every call is bounded as a whole ([`CALL_TIMEOUT`], 30 s, waiting for a
//! connection included) and then fails `Unavailable`; its connection is closed rather
//! than returned to the pool, and so is every other connection opened before (they are
//! not pinged first: a ping on a half-open connection waits for ever too), and the
//! listener subscribes again on a new connection. The database must be UTF-8 encoded,
//! and the role needs to create tables in its schema the first time (PostgreSQL 15 no
//! longer lets every role create in `public`).
//!
//! Migrations live in `server/migrations/postgres/`, embedded as for SQLite; sqlx's
//! migrator holds an advisory lock while it runs, so servers opening the same database
//! at once apply them once.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sqlx::error::DatabaseError;
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow, PgSslMode,
};
use sqlx::{Connection as _, Postgres, Row, Transaction};
use tessera_plugin_sdk::{RegistrationEntry, SpiffeId};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

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
    federation_conflict, join_token_conflict, migrator_of, new_entry_id, now_unix_secs,
    revision_to_i64, scope_json, similar_entry_conflict, stored_u64, to_unix_secs,
};
use crate::config::PostgresConfig;

/// The migrations, in version order: (version, description, SQL). Every file of
/// `server/migrations/postgres/` must be listed here (checked by a test).
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "initial",
    include_str!("../../migrations/postgres/0001_initial.sql"),
)];

/// How long a caller waits for a pooled connection before failing `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long opening waits for the first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one datastore call may take, waiting for a connection included, before it
/// fails `Unavailable` (see [`PostgresDatastore::bounded`]).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Session settings of every pooled connection, unless the connection string sets
/// them: how long a statement waits for a lock (the change-feed lock included), how
/// long a statement may run (shorter than [`CALL_TIMEOUT`], so that PostgreSQL cancels a
/// slow statement and the connection is kept), and how long a transaction may sit idle
/// (a client stuck while holding the lock).
const SESSION_SETTINGS: [(&str, &str); 3] = [
    ("lock_timeout", "10s"),
    ("statement_timeout", "20s"),
    ("idle_in_transaction_session_timeout", "60s"),
];

/// `application_name` of the pooled connections unless the connection string sets one.
const APPLICATION_NAME: &str = "tessera-server";

/// `application_name` of the connection that listens for changes.
const LISTENER_APPLICATION_NAME: &str = "tessera-server-listener";

/// The channel the `changes` trigger notifies.
const CHANNEL: &str = "tessera_changes";

/// Backoff of the listener while it cannot (re)subscribe: from this...
const RECONNECT_MIN: Duration = Duration::from_millis(100);

/// ...doubling up to this.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Takes the change-feed lock: the first statement of every write transaction. The
/// key ("tess", 1) is in the two-`int4` key space.
const LOCK_CHANGE_FEED: &str = "SELECT pg_advisory_xact_lock(1952805747, 1)";

/// Starts a multi-statement read: one snapshot, no writes.
const BEGIN_READ: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";

/// `GREATEST(latest recorded revision, pruned_through)`: the current revision even when
/// every change has been pruned.
macro_rules! current_revision {
    () => {
        "GREATEST(COALESCE((SELECT MAX(revision) FROM changes), 0), \
         (SELECT pruned_through FROM change_feed WHERE id = 1))"
    };
}

/// The PostgreSQL datastore.
#[derive(Debug)]
pub(crate) struct PostgresDatastore {
    pool: PgPool,
    /// The listener task (on connections of its own, so that it never waits behind
    /// queries), until `close`.
    listening: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    notifications: watch::Receiver<u64>,
    stop: CancellationToken,
    /// Stops the listener task when the datastore is dropped without `close`.
    _stop_on_drop: DropGuard,
    /// How long one call may take, waiting for a connection included.
    call_timeout: Duration,
    /// Shared with both pools' hooks and the listener.
    distrust: Arc<Distrust>,
}

/// When a call last went unanswered. A connection to a server that vanished without a
/// word (power loss, a partition, a failover to another address) gets no RST: it looks
/// healthy, and anything sent on it waits for ever. So once a call has timed out, the
/// connections opened before then are closed instead of being used again (new ones are
/// opened), and the listener subscribes again on a new connection.
#[derive(Debug)]
struct Distrust {
    since: watch::Sender<Option<Instant>>,
}

impl Distrust {
    fn new() -> Self {
        Self {
            since: watch::Sender::new(None),
        }
    }

    /// A call went unanswered now.
    fn mark(&self) {
        self.since.send_replace(Some(Instant::now()));
    }

    /// Whether a connection opened `age` ago predates the last unanswered call.
    fn covers(&self, age: Duration) -> bool {
        let Some(since) = *self.since.borrow() else {
            return false;
        };
        Instant::now()
            .checked_sub(age)
            .is_none_or(|opened| opened <= since)
    }
}

/// Options of both pools: connections are checked before use (a ping, as sqlx's
/// default `test_before_acquire`) unless [`Distrust`] says to close them, which is also
/// checked when they are released (sqlx pings a released connection, which would wait
/// for ever on a half-open one, holding its place in the pool).
fn pool_options(distrust: &Arc<Distrust>) -> PgPoolOptions {
    let before = Arc::clone(distrust);
    let after = Arc::clone(distrust);
    PgPoolOptions::new()
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            let distrusted = before.covers(meta.age);
            Box::pin(async move {
                if distrusted {
                    return Ok(false);
                }
                conn.ping().await?;
                Ok(true)
            })
        })
        .after_release(move |_conn, meta| {
            let distrusted = after.covers(meta.age);
            Box::pin(async move { Ok(!distrusted) })
        })
}

impl PostgresDatastore {
    /// See [`super::open_postgres`].
    pub(crate) async fn open(config: &PostgresConfig) -> Result<Self, DatastoreError> {
        Self::open_with(config, CALL_TIMEOUT).await
    }

    /// [`Self::open`] with another bound on each call (tests).
    async fn open_with(
        config: &PostgresConfig,
        call_timeout: Duration,
    ) -> Result<Self, DatastoreError> {
        let options = connect_options(&config.connection_string)?;
        let target = describe(&options);
        if let Some(host) = unverified_remote_host(&options) {
            tracing::warn!(
                %host,
                sslmode = ssl_mode_name(options.get_ssl_mode()),
                "the PostgreSQL server is reached over the network without verifying its \
                 certificate: an attacker on the path can strip TLS, ask for the password in \
                 clear text and answer in the database's place. Set sslmode=verify-full in \
                 connection_string (with sslrootcert=<CA file> for a private CA)"
            );
        }

        // One direct connection first: when the server is unreachable, opening fails at
        // once with the reason (a pool would retry until its timeout and then only say
        // that it timed out).
        let no_answer = || unreachable(&target, &format!("no answer within {CONNECT_TIMEOUT:?}"));
        let mut conn =
            match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await
            {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(unreachable(&target, &e.to_string())),
                Err(_) => return Err(no_answer()),
            };
        let checked = tokio::time::timeout(CONNECT_TIMEOUT, check_encoding(&mut conn))
            .await
            .map_err(|_| no_answer())?;
        // Closing is a courtesy to the server; the check's outcome is what counts.
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, conn.close()).await;
        checked?;
        migrate(&options).await?;

        let mut pool_options_with_settings = options.clone();
        let set = options_settings(pool_options_with_settings.get_options().unwrap_or_default());
        for (name, value) in SESSION_SETTINGS {
            if !set.iter().any(|s| s == name) {
                pool_options_with_settings = pool_options_with_settings.options([(name, value)]);
            }
        }
        if pool_options_with_settings.get_application_name().is_none() {
            pool_options_with_settings =
                pool_options_with_settings.application_name(APPLICATION_NAME);
        }
        let distrust = Arc::new(Distrust::new());
        let pool = pool_options(&distrust)
            .max_connections(config.max_connections)
            .connect_lazy_with(pool_options_with_settings);
        let listen_options = options.application_name(LISTENER_APPLICATION_NAME);

        // Subscribed before `open` returns: a change committed after it is announced.
        let subscription = subscribe(&listen_options, call_timeout, &distrust)
            .await
            .map_err(|e| unreachable(&target, &e.to_string()))?;
        let (wake, notifications) = watch::channel(0);
        let stop = CancellationToken::new();
        let listening = tokio::spawn(listen(
            subscription,
            listen_options,
            wake,
            stop.clone(),
            call_timeout,
            Arc::clone(&distrust),
        ));
        Ok(Self {
            pool,
            listening: std::sync::Mutex::new(Some(listening)),
            notifications,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            call_timeout,
            distrust,
        })
    }

    /// Runs `work` on a pooled connection, all of it (waiting for the connection
    /// included) within the call timeout. PostgreSQL answers or fails within
    /// `statement_timeout` and `lock_timeout`; this bounds what they cannot, a server
    /// that no longer answers at all (sqlx sets no TCP keepalive and no timeout of its
    /// own). Past it the call fails `Unavailable`, and the connection is closed, never
    /// returned to the pool, along with every connection opened before ([`Distrust`]).
    async fn bounded<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError> {
        let mut held: Option<PoolConnection<Postgres>> = None;
        let outcome = tokio::time::timeout(self.call_timeout, async {
            let conn = held.insert(self.pool.acquire().await?);
            work(&mut **conn).await
        })
        .await;
        match outcome {
            Ok(result) => result,
            Err(_) => {
                self.distrust.mark();
                // Mid-exchange, perhaps with a transaction open: detached and dropped,
                // the connection's socket is closed without another word (returning it
                // would have sqlx ping it, waiting for ever); the server rolls back.
                if let Some(conn) = held.take() {
                    drop(conn.detach());
                }
                Err(DatastoreError::Unavailable(
                    format!("PostgreSQL did not answer within {:?}", self.call_timeout).into(),
                ))
            }
        }
    }
}

/// Starts a write transaction holding the change-feed lock.
async fn begin_write(conn: &mut PgConnection) -> Result<Transaction<'_, Postgres>, DatastoreError> {
    let mut tx = conn.begin().await?;
    sqlx::query(LOCK_CHANGE_FEED).execute(&mut *tx).await?;
    Ok(tx)
}

/// Starts a read-only transaction on one snapshot.
async fn begin_read(conn: &mut PgConnection) -> Result<Transaction<'_, Postgres>, DatastoreError> {
    Ok(conn.begin_with(BEGIN_READ).await?)
}

/// Checks the database's encoding, on the first connection.
async fn check_encoding(conn: &mut PgConnection) -> Result<(), DatastoreError> {
    let encoding: String = sqlx::query_scalar("SELECT current_setting('server_encoding')")
        .fetch_one(&mut *conn)
        .await?;
    if encoding != "UTF8" {
        return Err(DatastoreError::Migration(
            format!("the database's encoding is {encoding}; tessera needs UTF8").into(),
        ));
    }
    Ok(())
}

/// Applies pending migrations through a pool of one connection of its own. Not through
/// the main pool: its `lock_timeout` would fail a server waiting for another one's long
/// migration. Not on a bare connection: `Migrator::run(&mut PgConnection)` cannot be
/// called from a spawned task ("implementation of `Acquire` is not general enough").
async fn migrate(options: &PgConnectOptions) -> Result<(), DatastoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(options.clone());
    let migrated = migrator().run(&pool).await;
    // Closing also ends the session (and its advisory lock) when a migration failed.
    pool.close().await;
    migrated.map_err(|e| DatastoreError::Migration(Box::new(e)))
}

/// The embedded migrations as a sqlx [`Migrator`].
fn migrator() -> Migrator {
    migrator_of(MIGRATIONS)
}

/// Parses `connection_string`: a `postgres://` (or `postgresql://`) URL, or libpq's
/// `key=value` form. Errors never quote the string (it may hold a password).
fn connect_options(connection_string: &str) -> Result<PgConnectOptions, DatastoreError> {
    let s = connection_string.trim();
    let url = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        s.to_owned()
    } else {
        keyword_value_url(s)?
    };
    PgConnectOptions::from_str(&url).map_err(|e| {
        DatastoreError::InvalidArgument(format!("connection_string cannot be used: {e}"))
    })
}

/// The keywords of libpq's `key=value` form that sqlx also reads as URL parameters.
const KEYWORDS: [&str; 12] = [
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "options",
];

/// libpq's `key=value` form (`host=/run/postgresql dbname=tessera`, values optionally
/// in single quotes with `\'` and `\\` escapes) as a `postgres://` URL whose parameters
/// carry every key. Hand-written because sqlx parses URLs only and this form is what
/// PostgreSQL operators commonly write.
fn keyword_value_url(s: &str) -> Result<String, DatastoreError> {
    let bad = |what: &str| {
        DatastoreError::InvalidArgument(format!(
            "connection_string is neither a postgres:// URL nor key=value pairs: {what}"
        ))
    };
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(bad("a key without '='"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => {
                        value.push(chars.next().ok_or_else(|| bad("unterminated quote"))?)
                    }
                    Some(c) => value.push(c),
                    None => return Err(bad("unterminated quote")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next().ok_or_else(|| bad("a trailing backslash"))?);
                } else {
                    value.push(c);
                }
            }
        }
        if !KEYWORDS.contains(&key.as_str()) {
            // The key is not secret; its value may be.
            return Err(bad(&format!("unsupported key {key:?}")));
        }
        pairs.push((key, value));
    }
    if pairs.is_empty() {
        return Err(bad("no pairs"));
    }
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in &pairs {
        query.append_pair(key, value);
    }
    // No host in the authority: sqlx then uses `host` from the parameters, or its
    // default (the Unix socket directory, as libpq).
    Ok(format!("postgres:///?{}", query.finish()))
}

/// Where `options` points, for messages: host and port (or socket directory) and
/// database, never user or password.
fn describe(options: &PgConnectOptions) -> String {
    let server = match options.get_socket() {
        Some(dir) => format!("Unix socket in {}", dir.display()),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    };
    match options.get_database() {
        Some(db) => format!("{server}, database {db}"),
        None => server,
    }
}

/// The names of the settings an `options` connection parameter sets, as PostgreSQL
/// reads them (lower case, `-` as `_`): `-c name=value`, `-cname=value` and
/// `--name=value` words, separated by whitespace that no `\` escapes.
fn options_settings(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let w = word.get_or_insert_with(String::new);
                w.extend(chars.next());
            }
            c if c.is_ascii_whitespace() => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    let mut names = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next()
        } else if let Some(setting) = word.strip_prefix("--") {
            Some(setting.to_owned())
        } else {
            word.strip_prefix("-c").map(str::to_owned)
        };
        if let Some((name, _)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            names.push(name.to_ascii_lowercase().replace('-', "_"));
        }
    }
    names
}

/// `host:port` when `options` reach the server over TCP on another host than this one
/// without verifying its certificate (any `sslmode` but `verify-ca` and `verify-full`):
/// there, an attacker on the path can strip TLS (sqlx, like libpq, accepts whatever
/// authentication the server asks for, cleartext password included) or answer in the
/// database's place. `None` for a Unix socket and for loopback (`localhost`,
/// 127.0.0.0/8, `::1`).
fn unverified_remote_host(options: &PgConnectOptions) -> Option<String> {
    if matches!(
        options.get_ssl_mode(),
        PgSslMode::VerifyCa | PgSslMode::VerifyFull
    ) {
        return None;
    }
    let host = options.get_host();
    if options.get_socket().is_some() || host.starts_with('/') {
        return None;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback());
    (!loopback).then(|| format!("{host}:{}", options.get_port()))
}

/// libpq's name of an `sslmode`.
fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// [`DatastoreError::Unavailable`] for a server that cannot be reached at `target`.
fn unreachable(target: &str, why: &str) -> DatastoreError {
    DatastoreError::Unavailable(format!("cannot connect to PostgreSQL at {target}: {why}").into())
}

/// A listener subscribed to [`CHANNEL`], on a one-connection pool made for it: a
/// listener dropped on a half-open connection leaves sqlx's `UNLISTEN *` waiting there
/// for ever, holding its pool's connection, so a new subscription never shares a pool
/// with an old one.
struct Subscription {
    listener: PgListener,
    pool: PgPool,
}

impl Subscription {
    /// Ends the subscription in the background: dropping the listener sends
    /// `UNLISTEN *`, and its pool is closed once the connection is back (or given up
    /// after `within`).
    fn end(self, within: Duration) {
        let Self { listener, pool } = self;
        drop(listener);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(within, pool.close()).await;
        });
    }
}

/// Subscribes to [`CHANNEL`] on a new connection (see [`Subscription`]), within
/// `within`; past it [`Distrust`] is marked before the half-made listener is dropped.
async fn subscribe(
    options: &PgConnectOptions,
    within: Duration,
    distrust: &Arc<Distrust>,
) -> Result<Subscription, sqlx::Error> {
    let pool = pool_options(distrust)
        .max_connections(1)
        // The listening connection lives as long as it works.
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(options.clone());
    let listen_pool = pool.clone();
    let subscribing = async move {
        let mut listener = PgListener::connect_with(&listen_pool).await?;
        // A lost connection is reported by `try_recv` (after reconnecting), so that it
        // wakes the server.
        listener.eager_reconnect(true);
        listener.listen(CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    let mut subscribing = std::pin::pin!(subscribing);
    let subscribed = tokio::select! {
        subscribed = &mut subscribing => subscribed,
        () = tokio::time::sleep(within) => {
            distrust.mark();
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("PostgreSQL did not answer within {within:?}"),
            )))
        }
    };
    match subscribed {
        Ok(listener) => Ok(Subscription { listener, pool }),
        Err(error) => {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(within, pool.close()).await;
            });
            Err(error)
        }
    }
}

/// Bumps the notification count.
fn wake_up(wake: &watch::Sender<u64>) {
    wake.send_modify(|n| *n = n.wrapping_add(1));
}

/// The listener task: bumps `wake` on every notification and after every
/// resubscription, until `stop`. Subscribes again on a new connection when the
/// connection is lost, and when a datastore call went unanswered ([`Distrust`]): the
/// listening connection may be half-open too, and would then wait for ever. Never
/// panics; errors are logged and retried.
async fn listen(
    subscription: Subscription,
    options: PgConnectOptions,
    wake: watch::Sender<u64>,
    stop: CancellationToken,
    call_timeout: Duration,
    distrust: Arc<Distrust>,
) {
    let mut distrusted = distrust.since.subscribe();
    distrusted.mark_unchanged();
    let mut subscription = Some(subscription);
    let mut subscribed_at = Instant::now();
    let mut backoff = RECONNECT_MIN;
    loop {
        let Some(current) = subscription.as_mut() else {
            let subscribed = tokio::select! {
                () = stop.cancelled() => return,
                subscribed = subscribe(&options, call_timeout, &distrust) => subscribed,
            };
            // This subscription is on a connection opened after the mark, if any.
            distrusted.mark_unchanged();
            match subscribed {
                Ok(fresh) => {
                    subscription = Some(fresh);
                    subscribed_at = Instant::now();
                    tracing::info!("listening for datastore changes again");
                    // Changes committed while the connection was down were announced to
                    // no one.
                    wake_up(&wake);
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "cannot listen for datastore changes");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
            continue;
        };
        // `try_recv` is cancel safe.
        let received = tokio::select! {
            () = stop.cancelled() => None,
            Ok(()) = distrusted.changed() => Some(None),
            received = current.listener.try_recv() => Some(Some(received)),
        };
        let received = match received {
            Some(Some(received)) => received,
            stopped_or_distrusted => {
                if let Some(ended) = subscription.take() {
                    ended.end(call_timeout);
                }
                if stopped_or_distrusted.is_none() {
                    return;
                }
                tracing::warn!(
                    "a datastore call went unanswered: listening for changes on a new connection"
                );
                continue;
            }
        };
        match received {
            Ok(Some(_)) => wake_up(&wake),
            // The connection was lost, and sqlx has reconnected and resubscribed.
            Ok(None) => {
                tracing::info!("the datastore listener reconnected");
                wake_up(&wake);
            }
            Err(error) => {
                tracing::warn!(%error, "lost the connection listening for datastore changes");
                if let Some(ended) = subscription.take() {
                    ended.end(call_timeout);
                }
                // A connection that worked for a while starts the backoff again; one that
                // keeps failing at once keeps growing it.
                if subscribed_at.elapsed() > RECONNECT_MAX {
                    backoff = RECONNECT_MIN;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
        }
    }
}

/// Maps an error PostgreSQL reported (other than a unique violation, which
/// `From<sqlx::Error> for DatastoreError` maps for every backend) by its SQLSTATE
/// (<https://www.postgresql.org/docs/current/errcodes-appendix.html>). Messages keep
/// PostgreSQL's primary message only, which names constraints, never row values.
pub(super) fn database_error(db: Box<dyn DatabaseError>) -> DatastoreError {
    let code = db.code().map(Cow::into_owned).unwrap_or_default();
    match code.as_str() {
        // Connection exceptions, insufficient resources (too_many_connections, disk
        // full), operator intervention (admin_shutdown, crash_shutdown,
        // cannot_connect_now, query_canceled), serialization failures and deadlocks,
        // a read-only server (a standby after a failover), lock_timeout.
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("57") => {
            DatastoreError::Unavailable(db.into())
        }
        "40001" | "40P01" | "25006" | "55P03" => DatastoreError::Unavailable(db.into()),
        // exclusion_violation: the hash-indexed uniqueness of entries.similarity_key.
        "23P01" => DatastoreError::Conflict("unique constraint violated".to_owned()),
        // character_not_in_repertoire (a NUL character in a text value),
        // untranslatable_character.
        "22021" | "22P05" => DatastoreError::InvalidArgument(
            "a text value holds a character PostgreSQL cannot store (NUL)".to_owned(),
        ),
        // data_corrupted, index_corrupted
        "XX001" | "XX002" => DatastoreError::Corrupt(format!("database: {}", db.message())),
        _ => DatastoreError::Internal(db.into()),
    }
}

/// Records one change in the feed (inside the caller's write transaction, which holds
/// the change-feed lock) and returns its revision. The trigger on `changes` notifies
/// the other servers at commit.
async fn record_change(
    conn: &mut PgConnection,
    kind: ChangeKind,
    object_id: &str,
    scope: &[&str],
) -> Result<u64, DatastoreError> {
    let revision: i64 = sqlx::query_scalar(concat!(
        "INSERT INTO changes (revision, kind, object_id, recorded_at, scope) VALUES ((SELECT ",
        current_revision!(),
        ") + 1, $1, $2, $3, $4) RETURNING revision"
    ))
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
    conn: &mut PgConnection,
    agent: &AttestedAgent,
) -> Result<(), DatastoreError> {
    let columns = AgentColumns::new(agent)?;

    // One statement decides: a banned row is left alone (the DO UPDATE's WHERE is
    // false, so no row changes).
    let written = sqlx::query(
        "INSERT INTO agents (spiffe_id, attestation_type, serial, previous_serial, \
         expires_at, aliases, first_attested_at, last_seen_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (spiffe_id) DO UPDATE SET \
           attestation_type = excluded.attestation_type, \
           serial = excluded.serial, \
           previous_serial = excluded.previous_serial, \
           expires_at = excluded.expires_at, \
           aliases = excluded.aliases, \
           first_attested_at = LEAST(agents.first_attested_at, excluded.first_attested_at), \
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
    conn: &mut PgConnection,
    trust_domain: &str,
) -> Result<Vec<AuthorityContribution>, DatastoreError> {
    let rows = sqlx::query(select_contributions!(
        "WHERE trust_domain = $1 ORDER BY server_id"
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
    conn: &mut PgConnection,
    trust_domain: &str,
    bundle: &BundleColumns,
) -> Result<(), DatastoreError> {
    let revision = record_change(conn, ChangeKind::BundleUpdated, trust_domain, &[]).await?;
    sqlx::query(
        "INSERT INTO bundles (trust_domain, x509_authorities, jwt_authorities, \
         sequence_number, revision) VALUES ($1, $2, $3, $4, $5) \
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
    conn: &mut PgConnection,
    trust_domain: &str,
) -> Result<bool, DatastoreError> {
    let deleted = sqlx::query("DELETE FROM bundles WHERE trust_domain = $1")
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
    conn: &mut PgConnection,
    spiffe_id: &str,
) -> Result<Option<Revocation>, DatastoreError> {
    let Some(row) = sqlx::query(select_revocations!("WHERE spiffe_id = $1"))
        .bind(spiffe_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let serials: Vec<String> = sqlx::query_scalar(
        "SELECT serial FROM instance_svids WHERE spiffe_id = $1 ORDER BY serial",
    )
    .bind(spiffe_id)
    .fetch_all(&mut *conn)
    .await?;
    revocation_from_row(&row, serials).map(Some)
}

/// What a caller learns of a join token it could not consume, consuming nothing: an
/// expired, unused token is useless to anyone, so it is deleted, and "expired" is said
/// only to a caller who holds its secret; anything else is
/// [`TokenOutcome::Invalid`].
async fn unconsumable_token(
    conn: &mut PgConnection,
    id: &str,
    secret_hash: &[u8; 32],
    now: i64,
) -> Result<TokenOutcome, DatastoreError> {
    let expired_hash: Option<Vec<u8>> = sqlx::query_scalar(
        "DELETE FROM join_tokens WHERE id = $1 AND used_at IS NULL AND expires_at <= $2 \
         RETURNING secret_hash",
    )
    .bind(id)
    .bind(now)
    .fetch_optional(conn)
    .await?;
    Ok(unconsumable_outcome(expired_hash, secret_hash))
}

/// Reads the current revision inside `conn`'s transaction (or as its own statement).
async fn current_revision_in(conn: &mut PgConnection) -> Result<u64, DatastoreError> {
    let revision: i64 = sqlx::query_scalar(concat!("SELECT ", current_revision!()))
        .fetch_one(conn)
        .await?;
    stored_u64(revision, "current revision")
}

/// Reads the bounds of the change feed inside `conn`'s transaction.
async fn feed_bounds_in(conn: &mut PgConnection) -> Result<FeedBounds, DatastoreError> {
    let current = current_revision_in(&mut *conn).await?;
    let pruned_through: i64 =
        sqlx::query_scalar("SELECT pruned_through FROM change_feed WHERE id = 1")
            .fetch_one(conn)
            .await?;
    FeedBounds::new(current, pruned_through)
}

/// PostgreSQL has a boolean type, and the schema uses it.
impl BoolColumn for Postgres {
    fn get_bool(row: &PgRow, col: &str, _what: &str) -> Result<bool, DatastoreError> {
        Ok(row.try_get(col)?)
    }
}

#[async_trait::async_trait]
impl Datastore for PostgresDatastore {
    async fn create_entry(&self, entry: NewEntry) -> Result<RegistrationEntry, DatastoreError> {
        let id = new_entry_id()?;
        let row = EntryColumns::new(entry)?;

        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
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
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
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
        })
        .await
    }

    async fn update_entry(
        &self,
        id: &str,
        entry: NewEntry,
    ) -> Result<Option<RegistrationEntry>, DatastoreError> {
        let row = EntryColumns::new(entry)?;

        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let old_parent: Option<String> =
                sqlx::query_scalar("SELECT parent_id FROM entries WHERE id = $1")
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
                "UPDATE entries SET spiffe_id = $1, parent_id = $2, selectors = $3, \
                 similarity_key = $4, x509_svid_ttl_secs = $5, jwt_svid_ttl_secs = $6, \
                 jwt_audiences = $7, jwt_multi_audience = $8, dns_names = $9, hint = $10, \
                 federates_with = $11, revision = $12 \
                 WHERE id = $13 RETURNING created_revision",
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
        })
        .await
    }

    async fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>, DatastoreError> {
        self.bounded(async move |conn| {
            sqlx::query(select_entries!("WHERE id = $1"))
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?
                .as_ref()
                .map(entry_from_row)
                .transpose()
        })
        .await
    }

    async fn list_entries(&self) -> Result<Vec<RegistrationEntry>, DatastoreError> {
        self.bounded(async move |conn| {
            sqlx::query(select_entries!("ORDER BY id"))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(entry_from_row)
                .collect()
        })
        .await
    }

    async fn list_entries_by_parent(
        &self,
        parent_ids: &[SpiffeId],
    ) -> Result<Vec<RegistrationEntry>, DatastoreError> {
        if parent_ids.is_empty() {
            return Ok(Vec::new());
        }
        // One statement for any number of parents: the IDs travel as a text array and
        // are compared as exact strings.
        let parents: Vec<&str> = parent_ids.iter().map(SpiffeId::as_str).collect();
        self.bounded(async move |conn| {
            sqlx::query(select_entries!("WHERE parent_id = ANY($1) ORDER BY id"))
                .bind(&parents)
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(entry_from_row)
                .collect()
        })
        .await
    }

    async fn delete_entry(&self, id: &str) -> Result<bool, DatastoreError> {
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let parent: Option<String> =
                sqlx::query_scalar("DELETE FROM entries WHERE id = $1 RETURNING parent_id")
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
        })
        .await
    }

    async fn create_join_token(&self, token: NewJoinToken) -> Result<(), DatastoreError> {
        let expires_at = to_unix_secs(token.expires_at, "join token expires_at")?;
        self.bounded(async move |conn| {
            let result = sqlx::query(
                "INSERT INTO join_tokens (id, secret_hash, alias, expires_at, used_at) \
                 VALUES ($1, $2, $3, $4, NULL)",
            )
            .bind(&token.id)
            .bind(&token.secret_hash[..])
            .bind(token.alias.as_ref().map(SpiffeId::as_str))
            .bind(expires_at)
            .execute(&mut *conn)
            .await;
            result.map_err(join_token_conflict)?;
            Ok(())
        })
        .await
    }

    async fn consume_join_token(
        &self,
        id: &str,
        secret_hash: &[u8; 32],
        now: SystemTime,
    ) -> Result<TokenOutcome, DatastoreError> {
        let now = to_unix_secs(now, "now")?;
        self.bounded(async move |conn| {
            // The one statement that decides: concurrent callers queue on the row lock and
            // re-check `used_at IS NULL` once the first has committed, so exactly one wins.
            let consumed: Option<Option<String>> = sqlx::query_scalar(
                "UPDATE join_tokens SET used_at = $1 \
                 WHERE id = $2 AND secret_hash = $3 AND used_at IS NULL AND expires_at > $1 \
                 RETURNING alias",
            )
            .bind(now)
            .bind(id)
            .bind(&secret_hash[..])
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(alias) = consumed {
                let alias = token_alias(id, alias)?;
                return Ok(TokenOutcome::Consumed { alias });
            }
            unconsumable_token(conn, id, secret_hash, now).await
        })
        .await
    }

    async fn upsert_agent(&self, agent: AttestedAgent) -> Result<(), DatastoreError> {
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            upsert_agent_in(&mut tx, &agent).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn attest_with_join_token(
        &self,
        id: &str,
        secret_hash: &[u8; 32],
        now: SystemTime,
        mut agent: AttestedAgent,
    ) -> Result<TokenOutcome, DatastoreError> {
        let now_secs = to_unix_secs(now, "now")?;
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let consumed: Option<Option<String>> = sqlx::query_scalar(
                "UPDATE join_tokens SET used_at = $1 \
                 WHERE id = $2 AND secret_hash = $3 AND used_at IS NULL AND expires_at > $1 \
                 RETURNING alias",
            )
            .bind(now_secs)
            .bind(id)
            .bind(&secret_hash[..])
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
            // A banned agent fails here, and dropping `tx` rolls the token back to unused.
            upsert_agent_in(&mut tx, &agent).await?;
            tx.commit().await?;
            Ok(TokenOutcome::Consumed { alias })
        })
        .await
    }

    async fn get_agent(
        &self,
        spiffe_id: &SpiffeId,
    ) -> Result<Option<AttestedAgent>, DatastoreError> {
        self.bounded(async move |conn| {
            sqlx::query(select_agents!("WHERE spiffe_id = $1"))
                .bind(spiffe_id.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .as_ref()
                .map(agent_from_row)
                .transpose()
        })
        .await
    }

    async fn list_agents(&self) -> Result<Vec<AttestedAgent>, DatastoreError> {
        self.bounded(async move |conn| {
            sqlx::query(select_agents!("ORDER BY spiffe_id"))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(agent_from_row)
                .collect()
        })
        .await
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
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let rotated = sqlx::query(
                "UPDATE agents SET previous_serial = $1, serial = $2, expires_at = $3 \
                 WHERE spiffe_id = $4 AND banned_at IS NULL \
                   AND (serial = $1 OR (previous_serial IS NOT NULL AND previous_serial = $1))",
            )
            .bind(current_serial)
            .bind(new_serial)
            .bind(expires_at)
            .bind(spiffe_id.as_str())
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
        })
        .await
    }

    async fn confirm_agent_serial(
        &self,
        spiffe_id: &SpiffeId,
        serial: &str,
    ) -> Result<(), DatastoreError> {
        self.bounded(async move |conn| {
            // Hot path (every call from an agent): a read, and the change-feed lock only
            // when a previous serial is still remembered.
            let pending: Option<i32> = sqlx::query_scalar(
                "SELECT 1 FROM agents WHERE spiffe_id = $1 AND serial = $2 \
                 AND previous_serial IS NOT NULL",
            )
            .bind(spiffe_id.as_str())
            .bind(serial)
            .fetch_optional(&mut *conn)
            .await?;
            if pending.is_none() {
                return Ok(());
            }
            let mut tx = begin_write(conn).await?;
            let confirmed = sqlx::query(
                "UPDATE agents SET previous_serial = NULL \
                 WHERE spiffe_id = $1 AND serial = $2 AND previous_serial IS NOT NULL",
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
        })
        .await
    }

    async fn get_bundle(&self, trust_domain: &str) -> Result<Option<StoredBundle>, DatastoreError> {
        self.bounded(async move |conn| {
            sqlx::query(select_bundles!("WHERE trust_domain = $1"))
                .bind(trust_domain)
                .fetch_optional(&mut *conn)
                .await?
                .as_ref()
                .map(bundle_from_row)
                .transpose()
        })
        .await
    }

    async fn set_bundle(&self, bundle: StoredBundle) -> Result<(), DatastoreError> {
        let columns = BundleColumns::new(&bundle)?;

        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            store_bundle_in(&mut tx, &bundle.trust_domain, &columns).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn publish_authorities(
        &self,
        contribution: AuthorityContribution,
        now: SystemTime,
    ) -> Result<bool, DatastoreError> {
        let columns = ContributionColumns::new(&contribution, now)?;
        let td = contribution.trust_domain.as_str();

        self.bounded(async move |conn| {
            // Under the change-feed lock, the read-modify-write of the bundle sees every
            // other server's publication that came before it.
            let mut tx = begin_write(conn).await?;
            sqlx::query(
                "INSERT INTO authority_contributions (trust_domain, server_id, x509_authorities, \
                 jwt_authorities, expires_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
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
                 WHERE trust_domain = $1 AND server_id <> $2 AND expires_at <= $3",
            )
            .bind(td)
            .bind(&contribution.server_id)
            .bind(columns.now)
            .execute(&mut *tx)
            .await?;
            let contributions = contributions_in(&mut tx, td).await?;
            let stored = sqlx::query(select_bundles!("WHERE trust_domain = $1"))
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
        })
        .await
    }

    async fn list_contributions(
        &self,
        trust_domain: &str,
    ) -> Result<Vec<AuthorityContribution>, DatastoreError> {
        self.bounded(async move |conn| contributions_in(conn, trust_domain).await)
            .await
    }

    async fn list_bundles(&self) -> Result<Vec<StoredBundle>, DatastoreError> {
        self.bounded(async move |conn| {
            sqlx::query(select_bundles!("ORDER BY trust_domain"))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(bundle_from_row)
                .collect()
        })
        .await
    }

    async fn delete_bundle(&self, trust_domain: &str) -> Result<bool, DatastoreError> {
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let deleted = delete_bundle_in(&mut tx, trust_domain).await?;
            if deleted {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            Ok(deleted)
        })
        .await
    }

    async fn create_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<(), DatastoreError> {
        let now = now_unix_secs();
        let td = relationship.trust_domain.name().to_owned();
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let inserted = sqlx::query(
                "INSERT INTO federation_relationships (trust_domain, bundle_endpoint_url, \
                 profile, endpoint_spiffe_id, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $5)",
            )
            .bind(&td)
            .bind(&relationship.bundle_endpoint_url)
            .bind(relationship.profile.name())
            .bind(endpoint_id_column(&relationship.profile))
            .bind(now)
            .execute(&mut *tx)
            .await;
            inserted.map_err(|e| federation_conflict(e, &td))?;
            record_change(&mut tx, ChangeKind::FederationUpdated, &td, &[]).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn update_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<bool, DatastoreError> {
        let td = relationship.trust_domain.name();
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let updated = sqlx::query(
                "UPDATE federation_relationships SET bundle_endpoint_url = $1, profile = $2, \
                 endpoint_spiffe_id = $3, updated_at = $4 WHERE trust_domain = $5",
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
        })
        .await
    }

    async fn get_federation_relationship(
        &self,
        trust_domain: &str,
    ) -> Result<Option<FederationRelationship>, DatastoreError> {
        self.bounded(async move |conn| {
            sqlx::query(select_relationships!("WHERE trust_domain = $1"))
                .bind(trust_domain)
                .fetch_optional(&mut *conn)
                .await?
                .as_ref()
                .map(relationship_from_row)
                .transpose()
        })
        .await
    }

    async fn list_federation_relationships(
        &self,
    ) -> Result<Vec<FederationRelationship>, DatastoreError> {
        self.bounded(async move |conn| {
            sqlx::query(select_relationships!("ORDER BY trust_domain"))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(relationship_from_row)
                .collect()
        })
        .await
    }

    async fn delete_federation_relationship(
        &self,
        trust_domain: &str,
    ) -> Result<bool, DatastoreError> {
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let deleted =
                sqlx::query("DELETE FROM federation_relationships WHERE trust_domain = $1")
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
        })
        .await
    }

    async fn ban_agent(
        &self,
        spiffe_id: &SpiffeId,
        now: SystemTime,
    ) -> Result<Option<AttestedAgent>, DatastoreError> {
        let now = to_unix_secs(now, "banned_at")?;
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let banned = sqlx::query(
                "UPDATE agents SET banned_at = $1 WHERE spiffe_id = $2 AND banned_at IS NULL",
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
            let agent = sqlx::query(select_agents!("WHERE spiffe_id = $1"))
                .bind(spiffe_id.as_str())
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(agent_from_row)
                .transpose()?;
            tx.commit().await?;
            Ok(agent)
        })
        .await
    }

    async fn evict_agent(&self, spiffe_id: &SpiffeId) -> Result<bool, DatastoreError> {
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let deleted = sqlx::query("DELETE FROM agents WHERE spiffe_id = $1")
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
        })
        .await
    }

    async fn revoke_identity(
        &self,
        spiffe_id: &SpiffeId,
        revoked_at: SystemTime,
        expires_at: SystemTime,
        scope: &[SpiffeId],
    ) -> Result<(Revocation, bool), DatastoreError> {
        let columns = RevocationColumns::new(revoked_at, expires_at, scope)?;

        self.bounded(async move |conn| {
            // The change-feed lock also orders this against `record_instance_svids`: the
            // serials read here include every SVID recorded before, and every later
            // recording sees this revocation.
            let mut tx = begin_write(conn).await?;
            // One statement: a revocation in force is kept as it is (idempotence); an
            // expired one not yet pruned is replaced.
            let written = sqlx::query(
                "INSERT INTO revocations (spiffe_id, revoked_at, expires_at, scope) \
                 VALUES ($1, $2, GREATEST($3, COALESCE( \
                     (SELECT MAX(expires_at) FROM instance_svids WHERE spiffe_id = $1), 0)), $4) \
                 ON CONFLICT (spiffe_id) DO UPDATE SET \
                   revoked_at = excluded.revoked_at, \
                   expires_at = excluded.expires_at, \
                   scope = excluded.scope \
                 WHERE revocations.expires_at <= $2",
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
        })
        .await
    }

    async fn get_revocation(
        &self,
        spiffe_id: &SpiffeId,
    ) -> Result<Option<Revocation>, DatastoreError> {
        self.bounded(async move |conn| {
            let mut tx = begin_read(conn).await?;
            let revocation = revocation_in(&mut tx, spiffe_id.as_str()).await?;
            tx.rollback().await?;
            Ok(revocation)
        })
        .await
    }

    async fn list_revocations(&self) -> Result<Vec<Revocation>, DatastoreError> {
        self.bounded(async move |conn| {
            let mut tx = begin_read(conn).await?;
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
        })
        .await
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
        let ids: Vec<&str> = ids.iter().map(SpiffeId::as_str).collect();
        self.bounded(async move |conn| {
            let revoked: Vec<String> = sqlx::query_scalar(
                "SELECT spiffe_id FROM revocations WHERE spiffe_id = ANY($1) AND expires_at > $2",
            )
            .bind(&ids)
            .bind(now)
            .fetch_all(&mut *conn)
            .await?;
            Ok(revoked.into_iter().collect())
        })
        .await
    }

    async fn record_instance_svids(
        &self,
        svids: &[InstanceSvid],
    ) -> Result<Vec<bool>, DatastoreError> {
        if svids.is_empty() {
            return Ok(Vec::new());
        }
        let columns = InstanceSvidColumns::new(svids)?;

        self.bounded(async move |conn| {
            // Insert first, then take back what a revocation in force covers, under the
            // change-feed lock: a concurrent `revoke_identity` runs wholly before (and is
            // seen here) or wholly after (and lists the serials).
            let mut tx = begin_write(conn).await?;
            sqlx::query(
                "INSERT INTO instance_svids (serial, spiffe_id, expires_at) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[])",
            )
            .bind(&columns.serials)
            .bind(&columns.spiffe_ids)
            .bind(&columns.expires_at)
            .execute(&mut *tx)
            .await?;
            let withdrawn: Vec<String> = sqlx::query_scalar(
                "DELETE FROM instance_svids \
                 WHERE serial = ANY($1) \
                   AND spiffe_id IN (SELECT spiffe_id FROM revocations WHERE expires_at > $2) \
                 RETURNING serial",
            )
            .bind(&columns.serials)
            .bind(now_unix_secs())
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(columns.recorded(&withdrawn))
        })
        .await
    }

    async fn revoked_serials(&self, now: SystemTime) -> Result<Vec<RevokedSerial>, DatastoreError> {
        let now = to_unix_secs(now, "now")?;
        self.bounded(async move |conn| {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT s.serial, r.revoked_at FROM instance_svids s \
                 JOIN revocations r ON r.spiffe_id = s.spiffe_id \
                 WHERE s.expires_at > $1 AND r.expires_at > $1 ORDER BY s.serial",
            )
            .bind(now)
            .fetch_all(&mut *conn)
            .await?;
            revoked_serials(rows)
        })
        .await
    }

    async fn prune_revocations(&self, now: SystemTime) -> Result<u64, DatastoreError> {
        let now = to_unix_secs(now, "now")?;
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let revocations = sqlx::query("DELETE FROM revocations WHERE expires_at <= $1")
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let serials = sqlx::query("DELETE FROM instance_svids WHERE expires_at <= $1")
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok(revocations + serials)
        })
        .await
    }

    async fn current_revision(&self) -> Result<u64, DatastoreError> {
        self.bounded(async move |conn| current_revision_in(conn).await)
            .await
    }

    async fn changes_since(&self, revision: u64) -> Result<ChangeSet, DatastoreError> {
        // A revision beyond i64 is beyond anything this datastore handed out.
        let Ok(since) = i64::try_from(revision) else {
            return Ok(ChangeSet::TooOld);
        };
        self.bounded(async move |conn| {
            // One snapshot: the feed bounds and the rows agree. Commit order is revision
            // order, so the snapshot holds every revision up to its current one.
            let mut tx = begin_read(conn).await?;
            let bounds = feed_bounds_in(&mut tx).await?;
            if bounds.lacks_changes_after(revision) {
                tx.rollback().await?;
                return Ok(ChangeSet::TooOld);
            }
            let rows = sqlx::query(select_changes!("WHERE revision > $1 ORDER BY revision"))
                .bind(since)
                .fetch_all(&mut *tx)
                .await?;
            tx.rollback().await?;
            rows.iter()
                .map(change_from_row)
                .collect::<Result<Vec<_>, _>>()
                .map(ChangeSet::Complete)
        })
        .await
    }

    async fn prune_changes(&self, keep: u64) -> Result<u64, DatastoreError> {
        self.bounded(async move |conn| {
            let mut tx = begin_write(conn).await?;
            let Some(cutoff) = feed_bounds_in(&mut tx).await?.prune_cutoff(keep)? else {
                tx.rollback().await?;
                return Ok(0);
            };
            let removed = sqlx::query("DELETE FROM changes WHERE revision <= $1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query("UPDATE change_feed SET pruned_through = $1 WHERE id = 1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(removed)
        })
        .await
    }

    async fn ping(&self) -> Result<(), DatastoreError> {
        self.bounded(async move |conn| {
            sqlx::query("SELECT 1").execute(&mut *conn).await?;
            Ok(())
        })
        .await
    }

    fn change_notifications(&self) -> Option<watch::Receiver<u64>> {
        Some(self.notifications.clone())
    }

    async fn close(&self) {
        self.stop.cancel();
        // Closing waits for every connection in use to come back: bounded, as a call
        // may be waiting on a server that no longer answers.
        let _ = tokio::time::timeout(self.call_timeout, self.pool.close()).await;
        let listening = self
            .listening
            .lock()
            .map(|mut l| l.take())
            .unwrap_or_default();
        if let Some(listening) = listening {
            let _ = tokio::time::timeout(self.call_timeout, listening).await;
        }
    }
}

#[cfg(test)]
mod tests {
    //! PostgreSQL's own tests: migrations, connection strings, notifications between
    //! servers, and losing the server. Its behaviour as a [`Datastore`] is tested by the
    //! suite (`super::super::suite`), which runs against both implementations.

    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use sqlx::{AssertSqlSafe, ConnectOptions as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::super::open_postgres;
    use super::super::suite::{
        AGENT_A, agent, assert_embedded_migrations_match, at, bundle, complete, drop_postgres,
        fresh_postgres, new_entry,
    };
    use super::*;

    #[test]
    fn embedded_migrations_match_the_directory() {
        assert_embedded_migrations_match("postgres", MIGRATIONS);
    }

    #[test]
    fn keyword_value_strings_become_options() {
        let options = connect_options(
            " host=/run/postgresql  port = 6543 dbname='tessera db' user=tessera \
             password='it''s \\'quoted\\' and spaced' sslmode=disable",
        );
        // `''` is not an escape in libpq's form: the value ends at the second quote and
        // `s` starts a new (invalid) key.
        assert!(options.is_err());

        let options = connect_options(
            " host=/run/postgresql  port = 6543 dbname='tessera db' user=tessera \
             password='it\\'s spaced' sslmode=disable application_name=a\\ b",
        )
        .unwrap();
        assert_eq!(
            options.get_socket().map(|p| p.as_path()),
            Some(Path::new("/run/postgresql"))
        );
        assert_eq!(options.get_port(), 6543);
        assert_eq!(options.get_database(), Some("tessera db"));
        assert_eq!(options.get_username(), "tessera");
        assert_eq!(options.get_application_name(), Some("a b"));
        assert!(matches!(
            options.get_ssl_mode(),
            sqlx::postgres::PgSslMode::Disable
        ));
        let url = options.to_url_lossy();
        assert_eq!(url.password(), Some("it%27s%20spaced"));
        assert_eq!(
            describe(&options),
            "Unix socket in /run/postgresql, database tessera db"
        );

        // Without a host: sqlx's default (a Unix socket directory, else localhost), as
        // libpq's.
        let options = connect_options("dbname=tessera").unwrap();
        assert!(
            options.get_socket().is_some() || options.get_host() == "localhost",
            "{}",
            describe(&options)
        );

        let url = connect_options("postgres://u:pw@db.example.org:5433/tessera").unwrap();
        assert_eq!(describe(&url), "db.example.org:5433, database tessera");

        // Errors name what is wrong, never a value.
        for bad in [
            "password=hunter2 stray",
            "host=h password",
            "host=h password='hunter2",
            "host=h secret=hunter2",
            "",
        ] {
            let err = connect_options(bad).unwrap_err();
            assert!(
                matches!(err, DatastoreError::InvalidArgument(_)),
                "{bad}: {err:?}"
            );
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn options_name_their_settings_as_postgresql_reads_them() {
        assert_eq!(
            options_settings(
                "-c lock_timeout=5s -clock_timeout=6s --Statement-Timeout=1min \
                 -c search_path=a\\ b -B 8 -c  work_mem=4MB -c"
            ),
            [
                "lock_timeout",
                "lock_timeout",
                "statement_timeout",
                "search_path",
                "work_mem"
            ]
        );
        // An escaped space does not end a word; a word without `=` sets nothing.
        assert_eq!(
            options_settings("-c application_name=a\\ -c\\ lock_timeout=1s -c geqo"),
            ["application_name"]
        );
        assert!(options_settings("").is_empty());
        // What sqlx writes for `options([(name, value)])` is read back.
        let written = PgConnectOptions::new().options([("lock_timeout", "1 s")]);
        assert_eq!(
            options_settings(written.get_options().unwrap()),
            ["lock_timeout"]
        );
    }

    #[test]
    fn unverified_tcp_to_another_host_is_told_apart() {
        let host = |s: &str| unverified_remote_host(&connect_options(s).unwrap());
        // Across a network without verifying the server: named, never with the password.
        for (string, named) in [
            ("postgres://u:pw@db.example.org/t", "db.example.org:5432"),
            (
                "postgres://u:pw@db.example.org:6543/t?sslmode=require",
                "db.example.org:6543",
            ),
            (
                "postgres://u:pw@10.0.0.5/t?sslmode=disable",
                "10.0.0.5:5432",
            ),
            (
                "postgres://u:pw@[2001:db8::1]/t?sslmode=allow",
                "[2001:db8::1]:5432",
            ),
            (
                "host=db.example.org dbname=t password=pw sslmode=prefer",
                "db.example.org:5432",
            ),
            ("hostaddr=192.0.2.7 dbname=t", "192.0.2.7:5432"),
            (
                "postgres://u@localhost.example.org/t",
                "localhost.example.org:5432",
            ),
        ] {
            assert_eq!(host(string).as_deref(), Some(named), "{string}");
        }
        // Verified, on a Unix socket, or on loopback: nothing to say.
        for string in [
            "postgres://u:pw@db.example.org/t?sslmode=verify-full",
            "postgres://u:pw@db.example.org/t?sslmode=verify-ca",
            "host=/run/postgresql dbname=t",
            "postgres:///t?host=/var/run/postgresql",
            "postgres://u:pw@127.0.0.1:54329/t",
            "postgres://u:pw@127.4.5.6/t?sslmode=disable",
            "postgres://u:pw@[::1]/t",
            "postgres://u:pw@LocalHost/t",
            "host=localhost dbname=t",
        ] {
            assert_eq!(host(string), None, "{string}");
        }
    }

    /// The chain of messages of an error, as the server prints it at start.
    fn chain(err: &DatastoreError) -> String {
        let mut message = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        message
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_open_at_once_naming_the_host_only() {
        // Nothing listens on a port we just bound and released.
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let config = PostgresConfig {
            connection_string: format!(
                "postgres://tessera_user:s3cret-pw@127.0.0.1:{port}/tessera"
            ),
            max_connections: 2,
        };
        let started = Instant::now();
        let err = open_postgres(&config).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, DatastoreError::Unavailable(_)), "{err:?}");
        let message = chain(&err);
        assert!(
            message.contains(&format!("127.0.0.1:{port}, database tessera")),
            "{message}"
        );
        assert!(!message.contains("s3cret"), "{message}");
        assert!(!message.contains("tessera_user"), "{message}");
    }

    #[tokio::test]
    async fn text_postgresql_cannot_store_is_an_invalid_argument() {
        let Some(config) = fresh_postgres().await else {
            return;
        };
        let ds = open_postgres(&config).await.unwrap();
        let mut e = new_entry("w/1", AGENT_A, &["unix:uid:1"]);
        e.hint = "secret\0hint".to_owned();
        let err = ds.create_entry(e).await.unwrap_err();
        assert!(matches!(err, DatastoreError::InvalidArgument(_)), "{err:?}");
        assert!(!chain(&err).contains("secret"), "{err}");
        assert_eq!(ds.current_revision().await.unwrap(), 0);
        // In JSON lists a NUL is escaped, and kept.
        let mut e = new_entry("w/1", AGENT_A, &["unix:uid:1"]);
        e.dns_names = vec!["a\0b".to_owned()];
        let created = ds.create_entry(e).await.unwrap();
        assert_eq!(ds.get_entry(&created.id).await.unwrap(), Some(created));
        drop(ds);
        drop_postgres(&config).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn servers_opening_a_fresh_database_at_once_migrate_it_once() {
        let Some(config) = fresh_postgres().await else {
            return;
        };
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let config = config.clone();
                tokio::spawn(async move { open_postgres(&config).await })
            })
            .collect();
        let mut stores = Vec::new();
        for open in opens {
            stores.push(open.await.unwrap().unwrap());
        }
        stores[3]
            .set_bundle(bundle("example.org", 1))
            .await
            .unwrap();
        for ds in &stores {
            assert_eq!(ds.current_revision().await.unwrap(), 1);
        }
        // And again, with the schema in place.
        let again = open_postgres(&config).await.unwrap();
        assert_eq!(
            again.get_bundle("example.org").await.unwrap(),
            Some(bundle("example.org", 1))
        );
        let mut conn = PgConnection::connect(&config.connection_string)
            .await
            .unwrap();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(versions, vec![1]);
        drop(stores);
        drop(again);
        drop_postgres(&config).await;
    }

    /// Waits for the next wake-up of `rx`, at most 10 s.
    async fn woken(rx: &mut watch::Receiver<u64>) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(10), rx.changed()).await,
            Ok(Ok(()))
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_write_through_one_server_wakes_the_other() {
        let Some(config) = fresh_postgres().await else {
            return;
        };
        let a = open_postgres(&config).await.unwrap();
        let b = open_postgres(&config).await.unwrap();
        let mut rx = b.change_notifications().unwrap();
        rx.mark_unchanged();
        a.create_entry(new_entry("w/1", AGENT_A, &["unix:uid:1"]))
            .await
            .unwrap();
        assert!(woken(&mut rx).await, "no wake-up after a write elsewhere");
        // The wake-up comes after the commit: the change is there to read.
        assert_eq!(b.current_revision().await.unwrap(), 1);

        // A write that records nothing (and a rolled back one) wakes no one.
        rx.mark_unchanged();
        assert!(
            !a.delete_entry("0123456789abcdef0123456789abcdef")
                .await
                .unwrap()
        );
        assert!(matches!(
            a.create_entry(new_entry("w/1", AGENT_A, &["unix:uid:1"]))
                .await,
            Err(DatastoreError::Conflict(_))
        ));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.changed())
                .await
                .is_err(),
            "woken without a change"
        );

        // After close the task is gone and the channel says so.
        b.close().await;
        assert!(rx.changed().await.is_err());
        drop(a);
        drop_postgres(&config).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_listener_wakes_after_reconnecting_and_keeps_listening() {
        let Some(config) = fresh_postgres().await else {
            return;
        };
        let a = open_postgres(&config).await.unwrap();
        let b = open_postgres(&config).await.unwrap();
        let mut rx = b.change_notifications().unwrap();
        rx.mark_unchanged();
        // An operator (or a failover) ends the listening connections.
        let mut admin = PgConnection::connect(&config.connection_string)
            .await
            .unwrap();
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = $1",
        )
        .bind(LISTENER_APPLICATION_NAME)
        .fetch_all(&mut admin)
        .await
        .unwrap();
        assert_eq!(ended, vec![true, true]);
        // Notifications may have been missed: a wake-up without any write.
        assert!(woken(&mut rx).await, "no wake-up after reconnecting");
        assert_eq!(b.current_revision().await.unwrap(), 0);
        // Listening again: the next write is announced.
        tokio::time::sleep(Duration::from_millis(200)).await;
        rx.mark_unchanged();
        a.set_bundle(bundle("example.org", 1)).await.unwrap();
        assert!(woken(&mut rx).await, "no wake-up after a write");
        assert_eq!(b.current_revision().await.unwrap(), 1);
        drop((a, b));
        drop_postgres(&config).await;
    }

    /// A TCP proxy to the PostgreSQL server that the test can take down (every
    /// connection through it cut, new ones closed at once) and bring back.
    struct Proxy {
        addr: SocketAddr,
        up: Arc<std::sync::atomic::AtomicBool>,
        cut: Arc<Mutex<CancellationToken>>,
        accept: tokio::task::JoinHandle<()>,
    }

    impl Proxy {
        async fn start(upstream: SocketAddr) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let cut = Arc::new(Mutex::new(CancellationToken::new()));
            let accept = {
                let up = Arc::clone(&up);
                let cut = Arc::clone(&cut);
                tokio::spawn(async move {
                    while let Ok((mut client, _)) = listener.accept().await {
                        if !up.load(std::sync::atomic::Ordering::SeqCst) {
                            continue;
                        }
                        let cut = cut.lock().unwrap().clone();
                        tokio::spawn(async move {
                            let Ok(mut server) = TcpStream::connect(upstream).await else {
                                return;
                            };
                            tokio::select! {
                                () = cut.cancelled() => {}
                                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            }
                        });
                    }
                })
            };
            Self {
                addr,
                up,
                cut,
                accept,
            }
        }

        fn down(&self) {
            self.up.store(false, std::sync::atomic::Ordering::SeqCst);
            let mut cut = self.cut.lock().unwrap();
            cut.cancel();
            *cut = CancellationToken::new();
        }

        fn up(&self) {
            self.up.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.accept.abort();
            self.cut.lock().unwrap().cancel();
        }
    }

    /// SECURITY.md §3.10 item 101 on PostgreSQL: while the database cannot be reached,
    /// writes fail `Unavailable` and write nothing; afterwards the datastore recovers on
    /// its own and its listener wakes the server once (it may have missed changes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn losing_the_database_is_unavailable_then_recovers() {
        let Some(config) = fresh_postgres().await else {
            return;
        };
        let direct = connect_options(&config.connection_string).unwrap();
        let upstream: SocketAddr = format!("{}:{}", direct.get_host(), direct.get_port())
            .parse()
            .unwrap();
        let proxy = Proxy::start(upstream).await;
        let mut url = url::Url::parse(&config.connection_string).unwrap();
        url.set_port(Some(proxy.addr.port())).unwrap();
        let through_proxy = PostgresConfig {
            connection_string: url.into(),
            max_connections: 4,
        };
        let ds = open_postgres(&through_proxy).await.unwrap();
        let other = open_postgres(&config).await.unwrap();
        let mut rx = ds.change_notifications().unwrap();
        ds.upsert_agent(agent(AGENT_A, "01")).await.unwrap();
        assert!(woken(&mut rx).await);
        rx.mark_unchanged();

        proxy.down();
        for _ in 0..3 {
            let err = ds
                .create_entry(new_entry("w/1", AGENT_A, &["unix:uid:1"]))
                .await
                .unwrap_err();
            assert!(matches!(err, DatastoreError::Unavailable(_)), "{err:?}");
            assert!(matches!(
                ds.ping().await,
                Err(DatastoreError::Unavailable(_))
            ));
        }
        // Another server writes meanwhile; this one cannot hear of it.
        other.set_bundle(bundle("example.org", 1)).await.unwrap();
        // Let the listener fail a few times (its backoff grows).
        tokio::time::sleep(Duration::from_millis(800)).await;
        rx.mark_unchanged();

        proxy.up();
        assert!(
            woken(&mut rx).await,
            "no wake-up after the database came back"
        );
        ds.ping().await.unwrap();
        // Nothing of the failed writes was written; the other server's change is there.
        assert_eq!(
            complete(ds.changes_since(1).await.unwrap()),
            vec![(2, ChangeKind::BundleUpdated, "example.org".to_owned())]
        );
        assert!(ds.list_entries().await.unwrap().is_empty());
        ds.rotate_agent_serial(
            &SpiffeId::parse(AGENT_A).unwrap(),
            "01",
            "02",
            at(2_000_000_000),
        )
        .await
        .unwrap();
        drop((ds, other, proxy));
        drop_postgres(&config).await;
    }

    /// A TCP proxy to the PostgreSQL server that the test can turn into a black hole:
    /// nothing forwarded either way, every socket kept open (no RST, no FIN), as after
    /// the server lost power or a partition. New connections are held the same way.
    /// When it forwards again, only new connections are forwarded: the server behind
    /// the held ones is gone for good.
    struct BlackHole {
        addr: SocketAddr,
        /// Cancelled when the current connections stop being forwarded.
        freeze: Arc<Mutex<Option<CancellationToken>>>,
        held: Arc<Mutex<Vec<TcpStream>>>,
        accept: tokio::task::JoinHandle<()>,
    }

    impl BlackHole {
        async fn start(upstream: SocketAddr) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let freeze = Arc::new(Mutex::new(Some(CancellationToken::new())));
            let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
            let accept = {
                let freeze = Arc::clone(&freeze);
                let held = Arc::clone(&held);
                tokio::spawn(async move {
                    while let Ok((mut client, _)) = listener.accept().await {
                        let Some(freeze) = freeze.lock().unwrap().clone() else {
                            held.lock().unwrap().push(client);
                            continue;
                        };
                        let held = Arc::clone(&held);
                        tokio::spawn(async move {
                            let Ok(mut server) = TcpStream::connect(upstream).await else {
                                return;
                            };
                            let frozen = tokio::select! {
                                () = freeze.cancelled() => true,
                                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                            };
                            if frozen {
                                held.lock().unwrap().extend([client, server]);
                            }
                        });
                    }
                })
            };
            Self {
                addr,
                freeze,
                held,
                accept,
            }
        }

        fn swallow(&self) {
            if let Some(freeze) = self.freeze.lock().unwrap().take() {
                freeze.cancel();
            }
        }

        fn forward(&self) {
            *self.freeze.lock().unwrap() = Some(CancellationToken::new());
        }
    }

    impl Drop for BlackHole {
        fn drop(&mut self) {
            self.accept.abort();
            self.swallow();
            self.held.lock().unwrap().clear();
        }
    }

    /// A server that stops answering without closing anything (a half-open connection:
    /// no RST ever comes) fails every call `Unavailable` within the call timeout instead
    /// of hanging it; the connections involved are closed, not pooled, and once the
    /// database answers again (on new connections) calls and notifications work again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_server_that_stops_answering_fails_calls_in_time_then_recovers() {
        let Some(config) = fresh_postgres().await else {
            return;
        };
        let direct = connect_options(&config.connection_string).unwrap();
        let upstream: SocketAddr = format!("{}:{}", direct.get_host(), direct.get_port())
            .parse()
            .unwrap();
        let hole = BlackHole::start(upstream).await;
        let mut url = url::Url::parse(&config.connection_string).unwrap();
        url.set_port(Some(hole.addr.port())).unwrap();
        let through_hole = PostgresConfig {
            connection_string: url.into(),
            max_connections: 4,
        };
        const TIMEOUT: Duration = Duration::from_millis(800);
        let ds = Arc::new(
            PostgresDatastore::open_with(&through_hole, TIMEOUT)
                .await
                .unwrap(),
        );
        let other = open_postgres(&config).await.unwrap();
        let mut rx = ds.change_notifications().unwrap();
        // Several pooled connections, idle and healthy.
        let warm: Vec<_> = (0..4)
            .map(|i| {
                let ds = Arc::clone(&ds);
                tokio::spawn(
                    async move { ds.upsert_agent(agent(&format!("{AGENT_A}{i}"), "01")).await },
                )
            })
            .collect();
        for task in warm {
            task.await.unwrap().unwrap();
        }
        assert!(woken(&mut rx).await);
        // Released connections are pinged before they are idle again.
        tokio::time::sleep(Duration::from_millis(200)).await;
        rx.mark_unchanged();

        // Calls in the middle of a transaction when the server goes: two of the pooled
        // connections wait for the change-feed lock, which another client holds; the
        // other two are idle.
        let mut admin = PgConnection::connect(&config.connection_string)
            .await
            .unwrap();
        sqlx::query(AssertSqlSafe(
            "SELECT pg_advisory_lock(1952805747, 1)".to_owned(),
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        let writes: Vec<_> = (0..2)
            .map(|i| {
                let ds = Arc::clone(&ds);
                tokio::spawn(async move {
                    let started = Instant::now();
                    let created = ds
                        .create_entry(new_entry(&format!("mid/{i}"), AGENT_A, &["unix:uid:1"]))
                        .await;
                    (created, started.elapsed())
                })
            })
            .collect();
        let waiting_for_the_lock = "SELECT COUNT(*) FROM pg_locks \
             WHERE locktype = 'advisory' AND NOT granted";
        while sqlx::query_scalar::<_, i64>(AssertSqlSafe(waiting_for_the_lock.to_owned()))
            .fetch_one(&mut admin)
            .await
            .unwrap()
            < 2
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        hole.swallow();
        for write in writes {
            let (created, took) = write.await.unwrap();
            let err = created.unwrap_err();
            assert!(matches!(err, DatastoreError::Unavailable(_)), "{err:?}");
            assert!(took < TIMEOUT + Duration::from_secs(2), "{took:?}");
        }
        // The server side of those connections is gone too (else the first to get the
        // lock would hold it until idle_in_transaction_session_timeout).
        sqlx::query(AssertSqlSafe(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND NOT granted"
                .to_owned(),
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        admin.close().await.unwrap();

        // Answering again, on new connections: the two idle connections opened before
        // are not tried (they would never answer), and calls succeed at once.
        hole.forward();
        for _ in 0..3 {
            let started = Instant::now();
            assert_eq!(ds.list_agents().await.unwrap().len(), 4);
            assert!(started.elapsed() < TIMEOUT, "{:?}", started.elapsed());
        }
        assert!(woken(&mut rx).await, "the listener did not subscribe again");

        hole.swallow();
        // More calls at once than the pool has connections, twice over: none hangs.
        for _ in 0..2 {
            let calls: Vec<_> = (0..8)
                .map(|i| {
                    let ds = Arc::clone(&ds);
                    tokio::spawn(async move {
                        let started = Instant::now();
                        let result = match i % 4 {
                            0 => ds
                                .create_entry(new_entry(
                                    &format!("w/{i}"),
                                    AGENT_A,
                                    &["unix:uid:1"],
                                ))
                                .await
                                .map(drop),
                            1 => ds.list_agents().await.map(drop),
                            2 => ds.current_revision().await.map(drop),
                            _ => ds.ping().await,
                        };
                        (result, started.elapsed())
                    })
                })
                .collect();
            for call in calls {
                let (result, took) = call.await.unwrap();
                let err = result.unwrap_err();
                assert!(matches!(err, DatastoreError::Unavailable(_)), "{err:?}");
                assert!(
                    err.to_string().contains("did not answer within 800ms")
                        || chain(&err).contains("did not answer within 800ms"),
                    "{}",
                    chain(&err)
                );
                assert!(took < TIMEOUT + Duration::from_secs(2), "{took:?}");
            }
        }
        // Another server writes meanwhile.
        other.set_bundle(bundle("example.org", 1)).await.unwrap();

        hole.forward();
        // The listener subscribes again on a new connection, and says so.
        assert!(woken(&mut rx).await, "the listener did not subscribe again");
        tokio::time::sleep(Duration::from_millis(200)).await;
        rx.mark_unchanged();
        // As many calls at once as the pool holds, and more: no connection of the
        // black hole is used again, and none of them holds a place in the pool.
        for _ in 0..2 {
            let calls: Vec<_> = (0..8)
                .map(|_| {
                    let ds = Arc::clone(&ds);
                    tokio::spawn(async move { ds.list_agents().await })
                })
                .collect();
            for call in calls {
                assert_eq!(call.await.unwrap().unwrap().len(), 4);
            }
        }
        // Nothing of the failed writes was written; the other server's change is there.
        assert!(ds.list_entries().await.unwrap().is_empty());
        assert_eq!(ds.current_revision().await.unwrap(), 5);
        // And the other server's next change is announced.
        other.set_bundle(bundle("example.org", 2)).await.unwrap();
        assert!(woken(&mut rx).await, "no wake-up after a write elsewhere");
        ds.create_entry(new_entry("w/after", AGENT_A, &["unix:uid:1"]))
            .await
            .unwrap();

        // Closing returns even with a call stuck in the black hole.
        hole.swallow();
        let stuck = {
            let ds = Arc::clone(&ds);
            tokio::spawn(async move { ds.list_agents().await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        ds.close().await;
        assert!(started.elapsed() < TIMEOUT * 3, "{:?}", started.elapsed());
        assert!(stuck.await.unwrap().is_err());
        drop((ds, other, hole));
        drop_postgres(&config).await;
    }

    #[tokio::test]
    async fn connections_get_the_session_settings_unless_the_string_sets_them() {
        let Some(config) = fresh_postgres().await else {
            return;
        };
        let url = url::Url::parse(&config.connection_string).unwrap();
        // The same database in libpq's key=value form, with settings of its own.
        let password = url.password().map(|pw| {
            url::form_urlencoded::parse(format!("p={pw}").as_bytes())
                .next()
                .unwrap()
                .1
                .into_owned()
        });
        let keyword_value = |options: &str| PostgresConfig {
            connection_string: format!(
                "host={} port={} user={} password='{}' dbname={} options='{options}'",
                url.host_str().unwrap(),
                url.port().unwrap_or(5432),
                url.username(),
                password.as_deref().unwrap_or_default(),
                url.path().trim_start_matches('/'),
            ),
            max_connections: 2,
        };
        for (config, lock_timeout, statement_timeout) in [
            (config.clone(), "10s", "20s"),
            (keyword_value("-c lock_timeout=3s"), "3s", "20s"),
            // `-cname=value` and `--name=value` (`-` for `_`) count too.
            (
                keyword_value("-clock_timeout=4s --statement-timeout=7s"),
                "4s",
                "7s",
            ),
        ] {
            let ds = PostgresDatastore::open(&config).await.unwrap();
            let mut conn = ds.pool.acquire().await.unwrap();
            let show = |setting: &'static str| format!("SHOW {setting}");
            let mut setting = async |name| -> String {
                sqlx::query_scalar(AssertSqlSafe(show(name)))
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap()
            };
            assert_eq!(setting("lock_timeout").await, lock_timeout);
            assert_eq!(setting("statement_timeout").await, statement_timeout);
            assert_eq!(setting("idle_in_transaction_session_timeout").await, "1min");
            assert_eq!(setting("application_name").await, APPLICATION_NAME);
            drop(conn);
            ds.close().await;
        }
        drop_postgres(&config).await;
    }

    #[tokio::test]
    async fn corrupt_numbers_are_errors_not_panics() {
        let Some(config) = fresh_postgres().await else {
            return;
        };
        let ds = open_postgres(&config).await.unwrap();
        ds.upsert_agent(agent(AGENT_A, "01")).await.unwrap();
        let mut conn = PgConnection::connect(&config.connection_string)
            .await
            .unwrap();
        sqlx::query(AssertSqlSafe(
            "UPDATE agents SET expires_at = -1".to_owned(),
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        assert!(matches!(
            ds.list_agents().await,
            Err(DatastoreError::Corrupt(_))
        ));
        drop(ds);
        drop_postgres(&config).await;
    }
}
