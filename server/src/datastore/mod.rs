//! The server's datastore: registration entries, join tokens, attested (and banned)
//! agents, bundles, revoked instance identities with the serials issued for them, and
//! the change feed that drives the `Sync` stream.
//!
//! Callers only ever see `Arc<dyn Datastore>`; [`open_sqlite`] gives the embedded
//! default, [`open_postgres`] a database that several servers share. Every
//! implementation must keep the contract written on [`Datastore`] (one test suite,
//! `suite.rs`, runs against both):
//!
//! - every write to entries, agents, bundles or revocations bumps one monotonically
//!   increasing revision and records a [`Change`] in the same transaction as the write
//!   (recording instance serials and pruning expired rows are not changes agents sync);
//! - concurrency-critical writes (join token consumption, refusing a banned agent,
//!   binding an agent's serial) are single statements, and recording an instance SVID
//!   and revoking its identity are serialised so that neither misses the other;
//! - a row that cannot be parsed back into a domain type is a
//!   [`DatastoreError::Corrupt`], never a panic;
//! - error messages name tables, row ids and columns, never secrets or raw selector
//!   values (SECURITY.md §2 rule 10).
//!
//! This module owns storage only: authorization (which agent may see which entry),
//! validation of operator input beyond what storage needs, and logging of suspicious
//! events (a serial mismatch) belong to the callers.

mod postgres;
mod rows;
mod sqlite;
#[cfg(test)]
mod suite;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::SqlSafeStr as _;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use tessera_plugin_sdk::{RegistrationEntry, Selector, SpiffeId, SpiffeIdTemplate, TrustDomain};

use crate::config::PostgresConfig;

/// A boxed error kept as the source of a [`DatastoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The storage seam of the server. Object-safe; used as `Arc<dyn Datastore>`.
#[async_trait::async_trait]
pub trait Datastore: Send + Sync + std::fmt::Debug {
    /// Stores a new registration entry under a fresh id (32 lowercase hex characters from
    /// 16 random bytes) and records [`ChangeKind::EntryUpserted`]. The returned entry has
    /// `created_revision == revision ==` the revision of that change.
    ///
    /// The JWT audiences are stored (and returned) sorted and deduplicated.
    ///
    /// [`DatastoreError::Conflict`] when an entry with the same spiffe_id, parent_id and
    /// selector set exists; [`DatastoreError::InvalidArgument`] when a TTL is not a
    /// whole number of seconds or the audiences break the rules of [`NewEntry`].
    async fn create_entry(&self, entry: NewEntry) -> Result<RegistrationEntry, DatastoreError>;

    /// Replaces every field of the entry `id` with those of `entry`, keeping its id and
    /// `created_revision`, and records [`ChangeKind::EntryUpserted`] in the same
    /// transaction; the returned entry's `revision` is the revision of that change (even
    /// when no field actually changed).
    ///
    /// `None` (and no change recorded) when there is no such entry;
    /// [`DatastoreError::Conflict`] when another entry has the new spiffe_id, parent_id
    /// and selector set; [`DatastoreError::InvalidArgument`] as for
    /// [`Datastore::create_entry`].
    async fn update_entry(
        &self,
        id: &str,
        entry: NewEntry,
    ) -> Result<Option<RegistrationEntry>, DatastoreError>;

    /// The entry with this id, if any.
    async fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>, DatastoreError>;

    /// Every entry, ordered by id.
    async fn list_entries(&self) -> Result<Vec<RegistrationEntry>, DatastoreError>;

    /// Every entry whose parent_id is one of `parent_ids` (an agent ID and its aliases),
    /// ordered by id. Exact string comparison.
    async fn list_entries_by_parent(
        &self,
        parent_ids: &[SpiffeId],
    ) -> Result<Vec<RegistrationEntry>, DatastoreError>;

    /// Deletes an entry and records [`ChangeKind::EntryDeleted`] with its id. `false`
    /// (and no change recorded) when there is no such entry.
    async fn delete_entry(&self, id: &str) -> Result<bool, DatastoreError>;

    /// Stores a join token. Only the hash of its secret is kept.
    /// [`DatastoreError::Conflict`] when the id is taken. Join tokens are not part of
    /// the change feed (agents never sync them).
    async fn create_join_token(&self, token: NewJoinToken) -> Result<(), DatastoreError>;

    /// Node attestation with a join token, in one transaction: consumes the token
    /// (as [`Datastore::consume_join_token`]) and, only when that succeeds, records
    /// `agent` with the token's alias added to its aliases. A token is therefore never
    /// spent without an agent being recorded (SECURITY.md §3.10 item 101): the caller
    /// signs the agent SVID first and discards it unless this returns `Consumed`. A
    /// token that cannot be consumed gives the answer of
    /// [`Datastore::consume_join_token`] (`Invalid`, or `Expired` with the expired token
    /// deleted), worked out in the same transaction without trying to consume it again.
    ///
    /// [`DatastoreError::AgentBanned`] when an agent with this ID is banned: checked in
    /// the same transaction, which is then rolled back (the token stays unused).
    async fn attest_with_join_token(
        &self,
        id: &str,
        secret_hash: &[u8; 32],
        now: SystemTime,
        agent: AttestedAgent,
    ) -> Result<TokenOutcome, DatastoreError>;

    /// Consumes a join token: a single atomic statement
    /// (`UPDATE ... SET used_at = now WHERE id AND secret_hash AND used_at IS NULL AND
    /// expires_at > now RETURNING alias`), so N concurrent calls with the same token give
    /// exactly one [`TokenOutcome::Consumed`].
    ///
    /// An unused token whose expiry is not after `now` is deleted; the caller gets
    /// [`TokenOutcome::Expired`] when it presented the right secret, else
    /// [`TokenOutcome::Invalid`]. An unknown id, a wrong secret or a used token all give
    /// [`TokenOutcome::Invalid`] (indistinguishable).
    async fn consume_join_token(
        &self,
        id: &str,
        secret_hash: &[u8; 32],
        now: SystemTime,
    ) -> Result<TokenOutcome, DatastoreError>;

    /// Inserts or replaces an attested agent (re-attestation) and records
    /// [`ChangeKind::AgentUpdated`]. On replace every field is overwritten except
    /// `first_attested_at`, which keeps the earlier of the stored and the new value,
    /// and `banned_at`, which is never written here (`agent.banned_at` is ignored).
    ///
    /// [`DatastoreError::AgentBanned`] (and nothing written) when the stored agent with
    /// this ID is banned; the check and the write are one statement.
    async fn upsert_agent(&self, agent: AttestedAgent) -> Result<(), DatastoreError>;

    /// Bans the agent: sets `banned_at = now` and records [`ChangeKind::AgentBanned`]
    /// with the agent ID as object and as scope. The row is kept, so the ID cannot be
    /// recorded again ([`Datastore::upsert_agent`], [`Datastore::attest_with_join_token`])
    /// nor renewed ([`Datastore::rotate_agent_serial`]).
    ///
    /// Returns the agent as stored afterwards; `None` (nothing recorded) when there is no
    /// such agent. Banning a banned agent keeps the first `banned_at` and records nothing.
    async fn ban_agent(
        &self,
        spiffe_id: &SpiffeId,
        now: SystemTime,
    ) -> Result<Option<AttestedAgent>, DatastoreError>;

    /// Evicts the agent: deletes its row (a ban included) and records
    /// [`ChangeKind::AgentEvicted`] with the agent ID as object and as scope. `false`
    /// (nothing recorded) when there is no such agent.
    async fn evict_agent(&self, spiffe_id: &SpiffeId) -> Result<bool, DatastoreError>;

    /// The attested agent with this ID, if any.
    async fn get_agent(
        &self,
        spiffe_id: &SpiffeId,
    ) -> Result<Option<AttestedAgent>, DatastoreError>;

    /// Every attested agent, ordered by SPIFFE ID.
    async fn list_agents(&self) -> Result<Vec<AttestedAgent>, DatastoreError>;

    /// Renewal of an agent SVID (SECURITY.md §2 rule 4). Succeeds only when
    /// `current_serial` is the agent's serial, or its previous serial while the current
    /// one is unconfirmed (`previous_serial` is `Some`). Then `previous_serial :=
    /// current_serial` (the serial the agent proved it holds, so a crash mid-renewal
    /// never locks it out), `serial := new_serial`, `expires_at := new_expires_at`, and
    /// [`ChangeKind::AgentUpdated`] is recorded.
    ///
    /// `false` when the agent is unknown or banned, or the serial did not match (a
    /// stale or possibly stolen SVID: the caller refuses and logs it).
    async fn rotate_agent_serial(
        &self,
        spiffe_id: &SpiffeId,
        current_serial: &str,
        new_serial: &str,
        new_expires_at: SystemTime,
    ) -> Result<bool, DatastoreError>;

    /// `serial` was seen in use: when it is the agent's current serial, forget the
    /// previous one (recording [`ChangeKind::AgentUpdated`] if that changed anything).
    /// Cheap when there is nothing to confirm: no write lock is taken.
    async fn confirm_agent_serial(
        &self,
        spiffe_id: &SpiffeId,
        serial: &str,
    ) -> Result<(), DatastoreError>;

    /// The bundle of a trust domain, if stored.
    async fn get_bundle(&self, trust_domain: &str) -> Result<Option<StoredBundle>, DatastoreError>;

    /// Inserts or replaces the bundle of `bundle.trust_domain` and records
    /// [`ChangeKind::BundleUpdated`] with the trust domain as object id. Comparing
    /// sequence numbers is the caller's business.
    async fn set_bundle(&self, bundle: StoredBundle) -> Result<(), DatastoreError>;

    /// One server's publication of its own keys (several servers may share a trust
    /// domain and a datastore, each with its own CA and JWT key), in one transaction
    /// that publications of other servers wait for:
    ///
    /// 1. stores `contribution` as this server's (replacing its previous one, keyed by
    ///    trust domain and `server_id`);
    /// 2. deletes the trust domain's other contributions whose `expires_at` is not
    ///    after `now` (servers gone for good: their keys are then past use);
    /// 3. rebuilds the trust domain's bundle from the remaining contributions with
    ///    [`merge_contributions`]; when its authorities differ from the stored bundle's
    ///    (or none is stored), stores it with the sequence number plus one (1 for the
    ///    first) and records [`ChangeKind::BundleUpdated`].
    ///
    /// Returns whether the stored bundle changed. [`DatastoreError::InvalidArgument`]
    /// when `server_id` is empty or longer than 64 bytes.
    async fn publish_authorities(
        &self,
        contribution: AuthorityContribution,
        now: SystemTime,
    ) -> Result<bool, DatastoreError>;

    /// Every stored contribution to `trust_domain`'s bundle, ordered by `server_id`.
    async fn list_contributions(
        &self,
        trust_domain: &str,
    ) -> Result<Vec<AuthorityContribution>, DatastoreError>;

    /// Every stored bundle (the own trust domain's and federated ones), ordered by
    /// trust domain.
    async fn list_bundles(&self) -> Result<Vec<StoredBundle>, DatastoreError>;

    /// Deletes the bundle of a trust domain and records [`ChangeKind::BundleDeleted`]
    /// with the trust domain as object id. `false` (nothing recorded) when none is
    /// stored. Refusing to delete the own trust domain's bundle is the caller's
    /// business.
    async fn delete_bundle(&self, trust_domain: &str) -> Result<bool, DatastoreError>;

    /// Stores a new federation relationship and records
    /// [`ChangeKind::FederationUpdated`] with the trust domain as object id;
    /// [`DatastoreError::Conflict`] when one exists for the trust domain.
    async fn create_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<(), DatastoreError>;

    /// Replaces the relationship of `relationship.trust_domain` and records
    /// [`ChangeKind::FederationUpdated`]; `false` (nothing recorded) when there is none.
    async fn update_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<bool, DatastoreError>;

    /// The relationship with a trust domain, if any.
    async fn get_federation_relationship(
        &self,
        trust_domain: &str,
    ) -> Result<Option<FederationRelationship>, DatastoreError>;

    /// Every relationship, ordered by trust domain.
    async fn list_federation_relationships(
        &self,
    ) -> Result<Vec<FederationRelationship>, DatastoreError>;

    /// Deletes the relationship with a trust domain and, in the same transaction, the
    /// bundle stored for it, recording [`ChangeKind::FederationUpdated`] (and
    /// [`ChangeKind::BundleDeleted`] when a bundle went). `false` (nothing recorded)
    /// when there is no such relationship.
    async fn delete_federation_relationship(
        &self,
        trust_domain: &str,
    ) -> Result<bool, DatastoreError>;

    /// Revokes one rendered SPIFFE ID, in one transaction: stores the revocation and
    /// records [`ChangeKind::IdentityRevoked`] with the ID as object and `scope` (the
    /// parent IDs of the entries it instantiates) as scope.
    ///
    /// The stored `expires_at` is the later of `expires_at` and the expiry of every
    /// instance SVID recorded for the ID ([`Datastore::record_instance_svids`]), so the
    /// revocation outlives each certificate it puts in the CRL.
    ///
    /// Idempotent: when a revocation of the ID is in force (`expires_at` after
    /// `revoked_at`), nothing is written and that revocation is returned with `false`.
    /// An expired one not yet pruned is replaced. Returns the revocation in force, with
    /// the serials recorded for the ID, and whether this call created it.
    async fn revoke_identity(
        &self,
        spiffe_id: &SpiffeId,
        revoked_at: SystemTime,
        expires_at: SystemTime,
        scope: &[SpiffeId],
    ) -> Result<(Revocation, bool), DatastoreError>;

    /// The revocation of this ID, if one is stored (expired ones too, until pruned),
    /// with its serials.
    async fn get_revocation(
        &self,
        spiffe_id: &SpiffeId,
    ) -> Result<Option<Revocation>, DatastoreError>;

    /// Every stored revocation (expired ones too, until pruned), with its serials,
    /// ordered by SPIFFE ID.
    async fn list_revocations(&self) -> Result<Vec<Revocation>, DatastoreError>;

    /// Which of `ids` have a revocation in force at `now` (`expires_at > now`), as
    /// their string forms.
    async fn revoked_among(
        &self,
        ids: &[SpiffeId],
        now: SystemTime,
    ) -> Result<BTreeSet<String>, DatastoreError>;

    /// Records the serials of X.509-SVIDs just signed for templated entries, in one
    /// write transaction: inserts every row, then removes again those whose SPIFFE ID
    /// has a revocation in force. One `bool` per input, in order: `false` when the
    /// identity was revoked meanwhile, and the caller must discard that SVID.
    ///
    /// Because a revocation ([`Datastore::revoke_identity`]) and this transaction are
    /// serialised, an SVID either sees the revocation here or is listed by it: a
    /// signing racing a revocation never escapes the CRL.
    async fn record_instance_svids(
        &self,
        svids: &[InstanceSvid],
    ) -> Result<Vec<bool>, DatastoreError>;

    /// [`Datastore::record_instance_svids`] for one SVID.
    async fn record_instance_svid(
        &self,
        spiffe_id: &SpiffeId,
        serial: &str,
        expires_at: SystemTime,
    ) -> Result<bool, DatastoreError> {
        let svid = InstanceSvid {
            spiffe_id: spiffe_id.clone(),
            serial: serial.to_owned(),
            expires_at,
        };
        let recorded = self
            .record_instance_svids(std::slice::from_ref(&svid))
            .await?;
        Ok(recorded.first().copied().unwrap_or(false))
    }

    /// The serials to publish in the CRL at `now`: every recorded instance SVID not yet
    /// expired whose SPIFFE ID has a revocation in force, with the revocation time,
    /// ordered by serial.
    async fn revoked_serials(&self, now: SystemTime) -> Result<Vec<RevokedSerial>, DatastoreError>;

    /// Deletes the revocations and the instance SVID rows that have expired at `now`;
    /// returns how many rows went. Records no change: agents forget a revocation at its
    /// `expires_at` on their own.
    async fn prune_revocations(&self, now: SystemTime) -> Result<u64, DatastoreError>;

    /// The latest revision of the change feed; 0 before the first write. Never goes
    /// down, not even when changes are pruned.
    async fn current_revision(&self) -> Result<u64, DatastoreError>;

    /// The changes recorded after `revision`, ordered by revision, or
    /// [`ChangeSet::TooOld`] when some of them were pruned or `revision` is ahead of the
    /// datastore (restored from a backup): the caller must then take a snapshot.
    async fn changes_since(&self, revision: u64) -> Result<ChangeSet, DatastoreError>;

    /// Prunes the change feed down to the latest `keep` revisions; returns how many
    /// changes were removed. Afterwards `changes_since(r)` is [`ChangeSet::TooOld`] for
    /// every `r` below `current_revision() - keep`.
    async fn prune_changes(&self, keep: u64) -> Result<u64, DatastoreError>;

    /// A trivial round trip, for health checks.
    async fn ping(&self) -> Result<(), DatastoreError>;

    /// Wakes when a change may have been recorded by another process sharing this
    /// datastore (another server on the same PostgreSQL database); the value only
    /// counts wake-ups. Each wake-up is at least as late as the commit of the changes it
    /// announces; after a lost connection it also wakes once, since notifications may
    /// have been missed. The server then reads [`Datastore::current_revision`] and wakes
    /// its `Sync` streams. `None` when only this process writes (SQLite): the server
    /// wakes its streams after its own writes.
    fn change_notifications(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Closes every connection (waits for the ones in use), e.g. at shutdown. Later
    /// calls fail with [`DatastoreError::Unavailable`].
    async fn close(&self);
}

/// A registration entry to create (or the new content of one to update); the datastore
/// assigns id and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// The SPIFFE ID the workload receives, or a template rendered per caller.
    pub spiffe_id: SpiffeIdTemplate,
    /// The agent ID (or node alias) allowed to serve the entry.
    pub parent_id: SpiffeId,
    /// Selectors the workload must all present.
    pub selectors: Vec<Selector>,
    /// X.509-SVID lifetime, whole seconds; `None`: the server default.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime, whole seconds; `None`: the server default.
    pub jwt_svid_ttl: Option<Duration>,
    /// Audiences JWT-SVIDs of this entry may carry; empty: any. At most
    /// [`MAX_JWT_AUDIENCES`] distinct ones, each non-empty, at most
    /// [`MAX_JWT_AUDIENCE_LEN`] bytes and free of control characters; stored sorted and
    /// deduplicated.
    pub jwt_audiences: Vec<String>,
    /// Whether one JWT-SVID may carry several audiences.
    pub jwt_multi_audience: bool,
    /// DNS names for the X.509-SVID.
    pub dns_names: Vec<String>,
    /// Hint for workloads holding several identities; may be empty.
    pub hint: String,
    /// Federated trust domains whose bundles the entry's workloads receive; stored
    /// sorted and deduplicated.
    pub federates_with: Vec<TrustDomain>,
}

/// A federation relationship with another trust domain (SPIFFE Federation §5): where
/// the server fetches that domain's bundle and how it authenticates the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationRelationship {
    /// The federated trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint, an https URL (checked by the caller).
    pub bundle_endpoint_url: String,
    /// How the endpoint is authenticated.
    pub profile: EndpointProfile,
}

/// The bundle endpoint profile of a [`FederationRelationship`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// `https_web`: a Web PKI server certificate.
    HttpsWeb,
    /// `https_spiffe`: the endpoint presents an X509-SVID with exactly this ID, which
    /// chains to the stored bundle of the federated trust domain.
    HttpsSpiffe {
        /// The SPIFFE ID the endpoint must present.
        endpoint_spiffe_id: SpiffeId,
    },
}

impl EndpointProfile {
    /// `https_web` or `https_spiffe`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::HttpsWeb => "https_web",
            Self::HttpsSpiffe { .. } => "https_spiffe",
        }
    }
}

/// A join token to store.
#[derive(Clone, PartialEq, Eq)]
pub struct NewJoinToken {
    /// The public part of `<id>.<secret>`; appears in the agent ID and in logs.
    pub id: String,
    /// SHA-256 of the secret part.
    pub secret_hash: [u8; 32],
    /// SPIFFE ID that becomes an alias of the agent using the token.
    pub alias: Option<SpiffeId>,
    /// The token is refused from this instant on.
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for NewJoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewJoinToken")
            .field("id", &self.id)
            .field("secret_hash", &"<redacted>")
            .field("alias", &self.alias)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// One server's keys in its trust domain's bundle ([`Datastore::publish_authorities`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityContribution {
    /// The trust domain.
    pub trust_domain: String,
    /// The publishing server's stable instance id (from its rotation journal).
    pub server_id: String,
    /// Its X.509 authorities (DER), in its own order (active, prepared, old; or the
    /// upstream roots).
    pub x509_authorities: Vec<Vec<u8>>,
    /// Its JWT authorities.
    pub jwt_authorities: Vec<StoredJwtAuthority>,
    /// When the last of these keys is past use (the latest `not_after`); the
    /// contribution is dropped then if the server has not published again.
    pub expires_at: SystemTime,
}

/// Maximum length of [`AuthorityContribution::server_id`].
pub const MAX_SERVER_ID_LEN: usize = 64;

/// The bundle authorities of several servers' contributions: each contribution's
/// authorities in its own order, contributions in the order given (by `server_id`),
/// an X.509 authority or a JWT `kid` that appears twice kept once, at its first place.
pub fn merge_contributions(
    contributions: &[AuthorityContribution],
) -> (Vec<Vec<u8>>, Vec<StoredJwtAuthority>) {
    let mut x509: Vec<Vec<u8>> = Vec::new();
    let mut jwt: Vec<StoredJwtAuthority> = Vec::new();
    for c in contributions {
        for der in &c.x509_authorities {
            if !x509.contains(der) {
                x509.push(der.clone());
            }
        }
        for key in &c.jwt_authorities {
            if !jwt.iter().any(|k| k.kid == key.kid) {
                jwt.push(key.clone());
            }
        }
    }
    (x509, jwt)
}

/// What [`Datastore::consume_join_token`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOutcome {
    /// The token was valid and is now used; it carried this alias.
    Consumed {
        /// The alias given to the agent, if the token had one.
        alias: Option<SpiffeId>,
    },
    /// Unknown id, wrong secret or already used: deliberately not told apart.
    Invalid,
    /// The token had expired; it has been deleted.
    Expired,
}

/// An agent that passed node attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedAgent {
    /// The agent ID, `spiffe://<td>/tessera/agent/<method>/<id>`.
    pub spiffe_id: SpiffeId,
    /// The node attestor that admitted it, e.g. `join_token`.
    pub attestation_type: String,
    /// Serial number (hex) of the agent's current SVID.
    pub serial: String,
    /// Serial of the SVID before the last renewal; `Some` exactly while `serial` has not
    /// been seen in use.
    pub previous_serial: Option<String>,
    /// Expiry of the current agent SVID.
    pub expires_at: SystemTime,
    /// Further IDs the agent acts as (entries with one of them as parent are its own).
    pub aliases: Vec<SpiffeId>,
    /// First successful attestation.
    pub first_attested_at: SystemTime,
    /// Last attestation, renewal or sync seen.
    pub last_seen_at: SystemTime,
    /// When an operator banned the agent; `None` while it is not banned.
    pub banned_at: Option<SystemTime>,
}

/// A revoked identity as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The rendered SPIFFE ID revoked.
    pub spiffe_id: SpiffeId,
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// After this no SVID of the ID can still be valid: agents forget the revocation,
    /// the datastore prunes it, and the server may sign the ID again.
    pub expires_at: SystemTime,
    /// Parent IDs of the entries the ID instantiated when it was revoked: the agents
    /// (by ID or alias) that are told about it.
    pub scope: Vec<SpiffeId>,
    /// Hex serials of the X.509-SVIDs recorded for the ID (not yet pruned), sorted.
    pub serials: Vec<String>,
}

/// An X.509-SVID signed for a templated entry, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSvid {
    /// The rendered SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The certificate serial, lowercase hex without leading zeros.
    pub serial: String,
    /// The certificate's NotAfter.
    pub expires_at: SystemTime,
}

/// One entry of the CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    /// The certificate serial, lowercase hex without leading zeros.
    pub serial: String,
    /// When its identity was revoked.
    pub revoked_at: SystemTime,
}

/// The trust bundle of one trust domain as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBundle {
    /// Trust domain name, e.g. `example.org`.
    pub trust_domain: String,
    /// The X.509 authorities, DER certificates.
    pub x509_authorities: Vec<Vec<u8>>,
    /// The JWT authorities (public keys with their `kid`).
    pub jwt_authorities: Vec<StoredJwtAuthority>,
    /// SPIFFE bundle sequence number (at most `i64::MAX`).
    pub sequence_number: u64,
}

/// A JWT signing key's public half as published in a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJwtAuthority {
    /// Key id (`kid` header of the tokens it signs).
    pub kid: String,
    /// SubjectPublicKeyInfo, DER.
    pub public_key: Vec<u8>,
    /// After this, no token it signed can still be valid; `None` while it signs.
    pub expires_at: Option<SystemTime>,
}

/// What a [`Change`] touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// An entry was created or updated; object id: the entry id.
    EntryUpserted,
    /// An entry was deleted; object id: the entry id.
    EntryDeleted,
    /// A bundle was stored; object id: the trust domain name.
    BundleUpdated,
    /// A (federated) bundle was deleted; object id: the trust domain name.
    BundleDeleted,
    /// A federation relationship was created, updated or deleted; object id: the
    /// trust domain name. Agents do not sync relationships; the server's refresh tasks
    /// follow them.
    FederationUpdated,
    /// An agent was attested, renewed or confirmed; object id: the agent ID.
    AgentUpdated,
    /// An agent was banned; object id and scope: the agent ID.
    AgentBanned,
    /// An agent was evicted (its record deleted); object id and scope: the agent ID.
    AgentEvicted,
    /// A rendered SPIFFE ID was revoked; object id: the ID; scope: the parent IDs of
    /// the entries it instantiated.
    IdentityRevoked,
}

impl ChangeKind {
    /// Every kind (a test keeps the stored names in sync over it).
    pub const ALL: [Self; 9] = [
        Self::EntryUpserted,
        Self::EntryDeleted,
        Self::BundleUpdated,
        Self::BundleDeleted,
        Self::FederationUpdated,
        Self::AgentUpdated,
        Self::AgentBanned,
        Self::AgentEvicted,
        Self::IdentityRevoked,
    ];

    /// The name stored in the `changes` table.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::EntryUpserted => "entry_upserted",
            Self::EntryDeleted => "entry_deleted",
            Self::BundleUpdated => "bundle_updated",
            Self::BundleDeleted => "bundle_deleted",
            Self::FederationUpdated => "federation_updated",
            Self::AgentUpdated => "agent_updated",
            Self::AgentBanned => "agent_banned",
            Self::AgentEvicted => "agent_evicted",
            Self::IdentityRevoked => "identity_revoked",
        }
    }

    /// Inverse of [`ChangeKind::as_str`].
    pub(crate) fn from_stored(s: &str) -> Option<Self> {
        Some(match s {
            "entry_upserted" => Self::EntryUpserted,
            "entry_deleted" => Self::EntryDeleted,
            "bundle_updated" => Self::BundleUpdated,
            "bundle_deleted" => Self::BundleDeleted,
            "federation_updated" => Self::FederationUpdated,
            "agent_updated" => Self::AgentUpdated,
            "agent_banned" => Self::AgentBanned,
            "agent_evicted" => Self::AgentEvicted,
            "identity_revoked" => Self::IdentityRevoked,
            _ => return None,
        })
    }
}

/// One entry of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The revision the write produced.
    pub revision: u64,
    /// What changed.
    pub kind: ChangeKind,
    /// Which object: see [`ChangeKind`].
    pub object_id: String,
    /// Which agents the change concerns, by agent ID or alias: for entry changes and
    /// revocations the parent IDs concerned (the old and the new parent of an update),
    /// for bans and evictions the agent ID; empty when the change concerns every agent.
    /// Lets `Sync` tell an agent only about what it serves.
    pub scope: Vec<String>,
}

/// Answer of [`Datastore::changes_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeSet {
    /// Every change after the asked revision, ordered by revision (maybe none).
    Complete(Vec<Change>),
    /// Some changes after the asked revision are no longer recorded (or the revision is
    /// ahead of the datastore): take a snapshot instead.
    TooOld,
}

/// Errors of a [`Datastore`].
#[non_exhaustive]
#[derive(thiserror::Error, Debug)]
pub enum DatastoreError {
    /// The database cannot be reached, is locked beyond the busy timeout, or its pool
    /// is exhausted or closed: retryable (gRPC `Unavailable`).
    #[error("datastore unavailable")]
    Unavailable(#[source] BoxError),
    /// The write collides with an existing object (gRPC `AlreadyExists`).
    #[error("datastore conflict: {0}")]
    Conflict(String),
    /// Stored data cannot be read back into domain types (gRPC `Internal`).
    #[error("corrupt datastore content: {0}")]
    Corrupt(String),
    /// The value cannot be stored faithfully (gRPC `InvalidArgument`).
    #[error("value cannot be stored: {0}")]
    InvalidArgument(String),
    /// The agent ID is banned and cannot be recorded again (gRPC `PermissionDenied`).
    #[error("agent is banned")]
    AgentBanned,
    /// Opening the database or migrating its schema failed.
    #[error("datastore schema migration failed")]
    Migration(#[source] BoxError),
    /// Anything else (a bug, or the random generator failing).
    #[error("internal datastore error")]
    Internal(#[source] BoxError),
}

/// Opens (creating it with mode 0600 if needed) the SQLite database at `path`, in WAL
/// mode with foreign keys on and a 5 s busy timeout, and applies pending migrations.
pub async fn open_sqlite(path: &Path) -> Result<Arc<dyn Datastore>, DatastoreError> {
    Ok(Arc::new(sqlite::SqliteDatastore::open(path).await?))
}

/// Opens the PostgreSQL database of `config` with a pool of `config.max_connections`
/// connections (plus one that listens for other servers' changes, see
/// [`Datastore::change_notifications`]) and applies pending migrations; several servers
/// may open the same database at once.
///
/// [`DatastoreError::Unavailable`] when the server cannot be reached now; its source
/// names the host and port (never the password).
pub async fn open_postgres(config: &PostgresConfig) -> Result<Arc<dyn Datastore>, DatastoreError> {
    Ok(Arc::new(postgres::PostgresDatastore::open(config).await?))
}

impl From<sqlx::Error> for DatastoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Database(db) => {
                if db.kind() == sqlx::error::ErrorKind::UniqueViolation {
                    return Self::Conflict("unique constraint violated".to_owned());
                }
                if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some()
                {
                    postgres::database_error(db)
                } else {
                    sqlite::database_error(db)
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

/// A sqlx [`Migrator`] of embedded migrations, given in version order as
/// (version, description, SQL); each backend embeds its own with `include_str!`
/// (sqlx's `migrate!` macro needs the `macros` feature, which the workspace does not
/// enable).
pub(crate) fn migrator_of(migrations: &[(i64, &'static str, &'static str)]) -> Migrator {
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

// Conversions shared by every implementation.

/// The `endpoint_spiffe_id` column of a profile.
pub(crate) fn endpoint_id_column(profile: &EndpointProfile) -> Option<&str> {
    match profile {
        EndpointProfile::HttpsWeb => None,
        EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => Some(endpoint_spiffe_id.as_str()),
    }
}

/// A revision handed out by the change feed, for binding.
pub(crate) fn revision_to_i64(revision: u64) -> Result<i64, DatastoreError> {
    i64::try_from(revision)
        .map_err(|_| DatastoreError::Corrupt("changes.revision: out of range".to_owned()))
}

/// Maps a unique violation to a [`DatastoreError::Conflict`] saying `what` collided (the
/// database's own message names a constraint, which tells an operator nothing).
fn conflict_saying(e: sqlx::Error, what: impl FnOnce() -> String) -> DatastoreError {
    match DatastoreError::from(e) {
        DatastoreError::Conflict(_) => DatastoreError::Conflict(what()),
        other => other,
    }
}

/// Maps the unique violation of an entry write (only `similarity_key` can collide: ids
/// are random and never change) to a [`DatastoreError::Conflict`] that says so.
pub(crate) fn similar_entry_conflict(e: sqlx::Error) -> DatastoreError {
    conflict_saying(e, || {
        "an entry with the same spiffe_id, parent_id and selectors exists".to_owned()
    })
}

/// Maps the unique violation of a join token insert (its id is the key) to a
/// [`DatastoreError::Conflict`] that says so.
pub(crate) fn join_token_conflict(e: sqlx::Error) -> DatastoreError {
    conflict_saying(e, || "a join token with this id exists".to_owned())
}

/// Maps the unique violation of a federation relationship insert (the trust domain
/// `td` is the key) to a [`DatastoreError::Conflict`] that says so.
pub(crate) fn federation_conflict(e: sqlx::Error, td: &str) -> DatastoreError {
    conflict_saying(e, || format!("a federation relationship with {td} exists"))
}

/// A [`NewEntry`] checked and converted to the `entries` columns, ready for binding.
pub(crate) struct EntryColumns {
    /// The entry, with its JWT audiences normalized.
    pub(crate) entry: NewEntry,
    pub(crate) similarity_key: String,
    pub(crate) selectors: String,
    pub(crate) x509_svid_ttl_secs: Option<i64>,
    pub(crate) jwt_svid_ttl_secs: Option<i64>,
    pub(crate) jwt_audiences: String,
    pub(crate) dns_names: String,
    pub(crate) federates_with: String,
}

impl EntryColumns {
    /// Validates and converts `entry`; [`DatastoreError::InvalidArgument`] when it
    /// cannot be stored.
    pub(crate) fn new(mut entry: NewEntry) -> Result<Self, DatastoreError> {
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
    pub(crate) fn into_entry(
        self,
        id: String,
        created_revision: u64,
        revision: u64,
    ) -> RegistrationEntry {
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

/// The columns of an [`AttestedAgent`] that are stored converted, ready for binding.
pub(crate) struct AgentColumns {
    /// `expires_at`, unix seconds.
    pub(crate) expires_at: i64,
    /// `first_attested_at`, unix seconds.
    pub(crate) first_attested_at: i64,
    /// `last_seen_at`, unix seconds.
    pub(crate) last_seen_at: i64,
    /// `aliases`, a JSON list.
    pub(crate) aliases: String,
}

impl AgentColumns {
    /// Converts the fields of `agent`; [`DatastoreError::InvalidArgument`] for a time
    /// that cannot be stored.
    pub(crate) fn new(agent: &AttestedAgent) -> Result<Self, DatastoreError> {
        Ok(Self {
            expires_at: to_unix_secs(agent.expires_at, "agent expires_at")?,
            first_attested_at: to_unix_secs(agent.first_attested_at, "agent first_attested_at")?,
            last_seen_at: to_unix_secs(agent.last_seen_at, "agent last_seen_at")?,
            aliases: json_list(&agent.aliases)?,
        })
    }
}

/// The authorities of a bundle or of a contribution in their storage form, ready for
/// binding.
pub(crate) struct AuthorityColumns {
    /// `x509_authorities`: a JSON list of the hex DER certificates.
    pub(crate) x509_authorities: String,
    /// `jwt_authorities`: see [`jwt_authorities_json`].
    pub(crate) jwt_authorities: String,
}

impl AuthorityColumns {
    /// Converts the authorities; [`DatastoreError::InvalidArgument`] for a JWT
    /// authority expiry that cannot be stored.
    pub(crate) fn new(
        x509_authorities: &[Vec<u8>],
        jwt_authorities: &[StoredJwtAuthority],
    ) -> Result<Self, DatastoreError> {
        let hex_x509: Vec<String> = x509_authorities.iter().map(hex::encode).collect();
        Ok(Self {
            x509_authorities: json_list(&hex_x509)?,
            jwt_authorities: jwt_authorities_json(jwt_authorities)?,
        })
    }
}

/// The `bundles` columns of a bundle to store (besides its trust domain and revision).
pub(crate) struct BundleColumns {
    /// `x509_authorities` and `jwt_authorities`.
    pub(crate) authorities: AuthorityColumns,
    /// `sequence_number`.
    pub(crate) sequence_number: i64,
}

impl BundleColumns {
    /// The columns of a bundle given to [`Datastore::set_bundle`];
    /// [`DatastoreError::InvalidArgument`] when it cannot be stored.
    pub(crate) fn new(bundle: &StoredBundle) -> Result<Self, DatastoreError> {
        let sequence_number = i64::try_from(bundle.sequence_number).map_err(|_| {
            DatastoreError::InvalidArgument("bundle sequence number above i64::MAX".to_owned())
        })?;
        Ok(Self {
            authorities: AuthorityColumns::new(&bundle.x509_authorities, &bundle.jwt_authorities)?,
            sequence_number,
        })
    }

    /// Step 3 of [`Datastore::publish_authorities`]: the trust domain's bundle rebuilt
    /// from its remaining `contributions`, with the sequence number after the `stored`
    /// bundle's (1 for the first); `None` when its authorities are the stored bundle's.
    pub(crate) fn rebuilt(
        stored: Option<StoredBundle>,
        contributions: &[AuthorityContribution],
    ) -> Result<Option<Self>, DatastoreError> {
        let (x509, jwt) = merge_contributions(contributions);
        if stored
            .as_ref()
            .is_some_and(|b| b.x509_authorities == x509 && b.jwt_authorities == jwt)
        {
            return Ok(None);
        }
        let sequence_number = stored.map_or(Ok(1), |b| {
            i64::try_from(b.sequence_number)
                .ok()
                .and_then(|n| n.checked_add(1))
                .ok_or_else(|| {
                    DatastoreError::Corrupt(format!(
                        "bundles[{}].sequence_number: out of range",
                        b.trust_domain
                    ))
                })
        })?;
        Ok(Some(Self {
            authorities: AuthorityColumns::new(&x509, &jwt)?,
            sequence_number,
        }))
    }
}

/// The `authority_contributions` columns of a contribution to publish, checked and
/// converted, ready for binding.
pub(crate) struct ContributionColumns {
    /// `x509_authorities` and `jwt_authorities`.
    pub(crate) authorities: AuthorityColumns,
    /// `expires_at`, unix seconds.
    pub(crate) expires_at: i64,
    /// The publication time, unix seconds: `updated_at`, and the instant other
    /// contributions are expired against.
    pub(crate) now: i64,
}

impl ContributionColumns {
    /// Checks and converts `contribution` published at `now`;
    /// [`DatastoreError::InvalidArgument`] when it cannot be stored.
    pub(crate) fn new(
        contribution: &AuthorityContribution,
        now: SystemTime,
    ) -> Result<Self, DatastoreError> {
        check_server_id(&contribution.server_id)?;
        Ok(Self {
            authorities: AuthorityColumns::new(
                &contribution.x509_authorities,
                &contribution.jwt_authorities,
            )?,
            expires_at: to_unix_secs(contribution.expires_at, "contribution expires_at")?,
            now: to_unix_secs(now, "now")?,
        })
    }
}

/// The `revocations` columns of [`Datastore::revoke_identity`], ready for binding.
pub(crate) struct RevocationColumns<'a> {
    /// `revoked_at`, unix seconds.
    pub(crate) revoked_at: i64,
    /// `expires_at` as asked (the stored one may be later), unix seconds.
    pub(crate) expires_at: i64,
    /// The scope, sorted and deduplicated (also the scope of the change).
    pub(crate) scope: Vec<&'a str>,
    /// `scope`, the JSON list of [`Self::scope`].
    pub(crate) scope_json: String,
}

impl<'a> RevocationColumns<'a> {
    /// Converts the arguments of [`Datastore::revoke_identity`];
    /// [`DatastoreError::InvalidArgument`] for a time that cannot be stored.
    pub(crate) fn new(
        revoked_at: SystemTime,
        expires_at: SystemTime,
        scope: &'a [SpiffeId],
    ) -> Result<Self, DatastoreError> {
        let revoked_at = to_unix_secs(revoked_at, "revoked_at")?;
        let expires_at = to_unix_secs(expires_at, "revocation expires_at")?;
        let mut scope: Vec<&str> = scope.iter().map(SpiffeId::as_str).collect();
        scope.sort_unstable();
        scope.dedup();
        Ok(Self {
            revoked_at,
            expires_at,
            scope_json: scope_json(&scope)?,
            scope,
        })
    }
}

/// The `scope` column of a change or a revocation: the agent IDs as a JSON list, sorted
/// and deduplicated.
pub(crate) fn scope_json(scope: &[&str]) -> Result<String, DatastoreError> {
    let mut scope: Vec<&str> = scope.to_vec();
    scope.sort_unstable();
    scope.dedup();
    serde_json::to_string(&scope).map_err(|e| DatastoreError::Internal(Box::new(e)))
}

/// The `instance_svids` rows of [`Datastore::record_instance_svids`], column by column
/// in input order, ready for binding.
pub(crate) struct InstanceSvidColumns<'a> {
    /// `spiffe_id` of each row.
    pub(crate) spiffe_ids: Vec<&'a str>,
    /// `serial` of each row.
    pub(crate) serials: Vec<&'a str>,
    /// `expires_at` of each row, unix seconds.
    pub(crate) expires_at: Vec<i64>,
}

impl<'a> InstanceSvidColumns<'a> {
    /// Converts `svids`; [`DatastoreError::InvalidArgument`] for an expiry that cannot
    /// be stored.
    pub(crate) fn new(svids: &'a [InstanceSvid]) -> Result<Self, DatastoreError> {
        let mut columns = Self {
            spiffe_ids: Vec::with_capacity(svids.len()),
            serials: Vec::with_capacity(svids.len()),
            expires_at: Vec::with_capacity(svids.len()),
        };
        for svid in svids {
            columns.spiffe_ids.push(svid.spiffe_id.as_str());
            columns.serials.push(svid.serial.as_str());
            columns
                .expires_at
                .push(to_unix_secs(svid.expires_at, "instance SVID expires_at")?);
        }
        Ok(columns)
    }

    /// The answer of [`Datastore::record_instance_svids`]: per input, whether its row
    /// stayed (its serial is not among the `withdrawn` ones).
    pub(crate) fn recorded(&self, withdrawn: &[String]) -> Vec<bool> {
        self.serials
            .iter()
            .map(|serial| !withdrawn.iter().any(|w| w == serial))
            .collect()
    }
}

/// Refuses a renewal to the serial being renewed ([`Datastore::rotate_agent_serial`]).
pub(crate) fn check_new_serial(
    current_serial: &str,
    new_serial: &str,
) -> Result<(), DatastoreError> {
    if new_serial == current_serial {
        return Err(DatastoreError::InvalidArgument(
            "the new agent serial equals the current one".to_owned(),
        ));
    }
    Ok(())
}

/// Adds the `alias` a consumed join token carried to the agent's aliases (once).
pub(crate) fn add_alias(agent: &mut AttestedAgent, alias: Option<&SpiffeId>) {
    if let Some(alias) = alias.filter(|a| !agent.aliases.contains(a)) {
        agent.aliases.push(alias.clone());
    }
}

/// Checks [`AuthorityContribution::server_id`]: 1 to [`MAX_SERVER_ID_LEN`] bytes.
pub(crate) fn check_server_id(server_id: &str) -> Result<(), DatastoreError> {
    if server_id.is_empty() || server_id.len() > MAX_SERVER_ID_LEN {
        return Err(DatastoreError::InvalidArgument(format!(
            "server id must be 1 to {MAX_SERVER_ID_LEN} bytes"
        )));
    }
    Ok(())
}

/// A fresh entry id: 16 random bytes as 32 lowercase hex characters.
pub(crate) fn new_entry_id() -> Result<String, DatastoreError> {
    let mut bytes = [0_u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|e| DatastoreError::Internal(Box::new(e)))?;
    Ok(hex::encode(bytes))
}

/// The key that makes two entries "the same" (SPIRE's similarity rule): spiffe_id,
/// parent_id and the selector set, independent of order and duplicates.
pub(crate) fn similarity_key(
    spiffe_id: &SpiffeIdTemplate,
    parent_id: &SpiffeId,
    selectors: &[Selector],
) -> Result<String, DatastoreError> {
    let mut sorted: Vec<String> = selectors.iter().map(ToString::to_string).collect();
    sorted.sort_unstable();
    sorted.dedup();
    serde_json::to_string(&(spiffe_id.as_str(), parent_id.as_str(), sorted))
        .map_err(|e| DatastoreError::Internal(Box::new(e)))
}

/// Unix seconds of `t`, for storage.
pub(crate) fn to_unix_secs(t: SystemTime, what: &str) -> Result<i64, DatastoreError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| DatastoreError::InvalidArgument(format!("{what} is before 1970")))?
        .as_secs();
    i64::try_from(secs)
        .map_err(|_| DatastoreError::InvalidArgument(format!("{what} is too far in the future")))
}

/// The current time in unix seconds (0 if the clock is before 1970).
pub(crate) fn now_unix_secs() -> i64 {
    to_unix_secs(SystemTime::now(), "now").unwrap_or(0)
}

/// Inverse of [`to_unix_secs`]; `what` names the column for the error.
pub(crate) fn from_unix_secs(secs: i64, what: &str) -> Result<SystemTime, DatastoreError> {
    u64::try_from(secs)
        .ok()
        .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .ok_or_else(|| DatastoreError::Corrupt(format!("{what}: timestamp out of range")))
}

/// A TTL as whole seconds, for storage; `what` names the field for the error.
pub(crate) fn ttl_to_secs(ttl: Duration, what: &str) -> Result<i64, DatastoreError> {
    if ttl.subsec_nanos() != 0 {
        return Err(DatastoreError::InvalidArgument(format!(
            "{what} must be a whole number of seconds"
        )));
    }
    i64::try_from(ttl.as_secs())
        .map_err(|_| DatastoreError::InvalidArgument(format!("{what} is too large")))
}

/// The most distinct JWT audiences an entry may list.
pub const MAX_JWT_AUDIENCES: usize = 32;

/// The longest JWT audience an entry may list, in bytes.
pub const MAX_JWT_AUDIENCE_LEN: usize = 256;

/// The JWT audiences of an entry as stored: checked (see [`NewEntry::jwt_audiences`]),
/// sorted and deduplicated. Errors name the position of a bad audience, not its value.
pub(crate) fn normalize_jwt_audiences(
    mut audiences: Vec<String>,
) -> Result<Vec<String>, DatastoreError> {
    for (i, audience) in audiences.iter().enumerate() {
        if audience.is_empty() {
            return Err(DatastoreError::InvalidArgument(format!(
                "jwt_audiences[{i}] is empty"
            )));
        }
        if audience.len() > MAX_JWT_AUDIENCE_LEN {
            return Err(DatastoreError::InvalidArgument(format!(
                "jwt_audiences[{i}] is longer than {MAX_JWT_AUDIENCE_LEN} bytes"
            )));
        }
        if audience.chars().any(char::is_control) {
            return Err(DatastoreError::InvalidArgument(format!(
                "jwt_audiences[{i}] contains a control character"
            )));
        }
    }
    audiences.sort_unstable();
    audiences.dedup();
    if audiences.len() > MAX_JWT_AUDIENCES {
        return Err(DatastoreError::InvalidArgument(format!(
            "more than {MAX_JWT_AUDIENCES} jwt_audiences"
        )));
    }
    Ok(audiences)
}

/// A [`StoredJwtAuthority`] in its JSON storage form.
#[derive(serde::Serialize, serde::Deserialize)]
struct JwtAuthorityJson {
    kid: String,
    /// Hex of the SubjectPublicKeyInfo DER.
    public_key: String,
    /// Unix seconds.
    expires_at: Option<i64>,
}

/// The JWT authorities of a bundle as a JSON array of
/// `{"kid", "public_key" (hex), "expires_at" (unix seconds or null)}`, for storage.
pub(crate) fn jwt_authorities_json(
    authorities: &[StoredJwtAuthority],
) -> Result<String, DatastoreError> {
    let raw = authorities
        .iter()
        .map(|a| {
            Ok(JwtAuthorityJson {
                kid: a.kid.clone(),
                public_key: hex::encode(&a.public_key),
                expires_at: a
                    .expires_at
                    .map(|t| to_unix_secs(t, "jwt authority expires_at"))
                    .transpose()?,
            })
        })
        .collect::<Result<Vec<_>, DatastoreError>>()?;
    serde_json::to_string(&raw).map_err(|e| DatastoreError::Internal(Box::new(e)))
}

/// Inverse of [`jwt_authorities_json`]; `what` names the row and column for the error.
pub(crate) fn stored_jwt_authorities(
    json: &str,
    what: &str,
) -> Result<Vec<StoredJwtAuthority>, DatastoreError> {
    let raw: Vec<JwtAuthorityJson> = serde_json::from_str(json).map_err(|e| {
        DatastoreError::Corrupt(format!("{what}: not a JSON list of JWT authorities: {e}"))
    })?;
    raw.into_iter()
        .enumerate()
        .map(|(i, a)| {
            Ok(StoredJwtAuthority {
                public_key: hex::decode(&a.public_key)
                    .map_err(|e| DatastoreError::Corrupt(format!("{what}[{i}].public_key: {e}")))?,
                expires_at: a
                    .expires_at
                    .map(|s| from_unix_secs(s, &format!("{what}[{i}].expires_at")))
                    .transpose()?,
                kid: a.kid,
            })
        })
        .collect()
}

/// A stored 0/1 flag; `what` names the row and column for the error.
pub(crate) fn stored_bool(v: i64, what: &str) -> Result<bool, DatastoreError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DatastoreError::Corrupt(format!("{what}: not 0 or 1"))),
    }
}

/// A stored non-negative integer (revision, sequence number, TTL) as `u64`.
pub(crate) fn stored_u64(v: i64, what: &str) -> Result<u64, DatastoreError> {
    u64::try_from(v).map_err(|_| DatastoreError::Corrupt(format!("{what}: negative value")))
}

/// A stored SPIFFE ID; `what` names the row and column for the error (never the value).
pub(crate) fn stored_spiffe_id(s: &str, what: &str) -> Result<SpiffeId, DatastoreError> {
    SpiffeId::parse(s)
        .map_err(|e| DatastoreError::Corrupt(format!("{what}: invalid SPIFFE ID: {e}")))
}

/// A stored SPIFFE ID template; `what` names the row and column for the error (never
/// the value).
pub(crate) fn stored_spiffe_id_template(
    s: &str,
    what: &str,
) -> Result<SpiffeIdTemplate, DatastoreError> {
    SpiffeIdTemplate::parse(s)
        .map_err(|e| DatastoreError::Corrupt(format!("{what}: invalid SPIFFE ID template: {e}")))
}

/// A stored JSON array of strings, each parsed by `parse`; `what` names the row and
/// column for the error.
pub(crate) fn stored_json_list<T, E: std::fmt::Display>(
    json: &str,
    what: &str,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<Vec<T>, DatastoreError> {
    let raw: Vec<String> = serde_json::from_str(json)
        .map_err(|e| DatastoreError::Corrupt(format!("{what}: not a JSON list of strings: {e}")))?;
    raw.iter()
        .map(|s| {
            parse(s).map_err(|e| DatastoreError::Corrupt(format!("{what}: invalid element: {e}")))
        })
        .collect()
}

/// A JSON array of the `Display` forms of `items`, for storage.
pub(crate) fn json_list<T: std::fmt::Display>(items: &[T]) -> Result<String, DatastoreError> {
    let raw: Vec<String> = items.iter().map(ToString::to_string).collect();
    serde_json::to_string(&raw).map_err(|e| DatastoreError::Internal(Box::new(e)))
}
