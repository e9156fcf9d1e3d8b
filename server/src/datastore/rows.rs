//! Reading rows back into domain types, and assembling answers out of them, once for
//! both backends.
//!
//! The two schemas store every column in the same form (times and revisions as
//! 64-bit integers, lists as JSON text, keys as text), so one decoder per table serves
//! both, generic over the sqlx row type through [`StoredRow`]. The one column type that
//! differs is a boolean (`entries.jwt_multi_audience`): SQLite's STRICT tables have no
//! boolean type, so it is an INTEGER checked to be 0 or 1 there and a BOOLEAN in
//! PostgreSQL; each backend says how to read it ([`BoolColumn`]).
//!
//! Every error is a [`DatastoreError`] naming the table, the row and the column, never
//! a stored value (SECURITY.md §2 rule 10); a column of the wrong type is
//! [`DatastoreError::Corrupt`] (through `From<sqlx::Error>`).

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{ColumnIndex, Database, Decode, Row, Type};
use tessera_plugin_sdk::{RegistrationEntry, Selector, SpiffeId, TrustDomain};

use super::{
    AttestedAgent, AuthorityContribution, Change, ChangeKind, DatastoreError, EndpointProfile,
    FederationRelationship, Revocation, RevokedSerial, StoredBundle, TokenOutcome, from_unix_secs,
    revision_to_i64, stored_json_list, stored_jwt_authorities, stored_spiffe_id,
    stored_spiffe_id_template, stored_u64,
};

// The columns each decoder reads, as the head of a `SELECT`; the tail (`WHERE`,
// `ORDER BY`, with the backend's placeholders) stays with each backend. Kept here so
// that a decoder and its column list change together.

/// `SELECT` of the `entries` columns [`entry_from_row`] reads, then `$tail`.
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

/// `SELECT` of the `agents` columns [`agent_from_row`] reads, then `$tail`.
macro_rules! select_agents {
    ($tail:literal) => {
        concat!(
            "SELECT spiffe_id, attestation_type, serial, previous_serial, expires_at, aliases, ",
            "first_attested_at, last_seen_at, banned_at FROM agents ",
            $tail
        )
    };
}

/// `SELECT` of the `bundles` columns [`bundle_from_row`] reads, then `$tail`.
macro_rules! select_bundles {
    ($tail:literal) => {
        concat!(
            "SELECT trust_domain, x509_authorities, jwt_authorities, sequence_number ",
            "FROM bundles ",
            $tail
        )
    };
}

/// `SELECT` of the `authority_contributions` columns [`contribution_from_row`] reads,
/// then `$tail`.
macro_rules! select_contributions {
    ($tail:literal) => {
        concat!(
            "SELECT server_id, x509_authorities, jwt_authorities, expires_at ",
            "FROM authority_contributions ",
            $tail
        )
    };
}

/// `SELECT` of the `federation_relationships` columns [`relationship_from_row`] reads,
/// then `$tail`.
macro_rules! select_relationships {
    ($tail:literal) => {
        concat!(
            "SELECT trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id ",
            "FROM federation_relationships ",
            $tail
        )
    };
}

/// `SELECT` of the `revocations` columns [`revocation_from_row`] reads, then `$tail`.
macro_rules! select_revocations {
    ($tail:literal) => {
        concat!(
            "SELECT spiffe_id, revoked_at, expires_at, scope FROM revocations ",
            $tail
        )
    };
}

/// `SELECT` of the `changes` columns [`change_from_row`] reads, then `$tail`.
macro_rules! select_changes {
    ($tail:literal) => {
        concat!(
            "SELECT revision, kind, object_id, scope FROM changes ",
            $tail
        )
    };
}

pub(super) use {
    select_agents, select_bundles, select_changes, select_contributions, select_entries,
    select_relationships, select_revocations,
};

/// How a backend stores a boolean column (see the module documentation).
pub(super) trait BoolColumn: Database {
    /// The boolean in column `col` of `row`; `what` names the row and column for the
    /// error.
    fn get_bool(row: &Self::Row, col: &str, what: &str) -> Result<bool, DatastoreError>;
}

/// A result row of either backend, read by column name. Implemented for the rows of
/// every database whose text and integer columns sqlx decodes as `String` and `i64`.
pub(super) trait StoredRow {
    /// A `TEXT NOT NULL` column.
    fn text(&self, col: &str) -> Result<String, DatastoreError>;
    /// A nullable `TEXT` column.
    fn opt_text(&self, col: &str) -> Result<Option<String>, DatastoreError>;
    /// An integer (`INTEGER` in SQLite, `BIGINT` in PostgreSQL) `NOT NULL` column.
    fn int(&self, col: &str) -> Result<i64, DatastoreError>;
    /// A nullable integer column.
    fn opt_int(&self, col: &str) -> Result<Option<i64>, DatastoreError>;
    /// A boolean column, as its backend stores it ([`BoolColumn`]).
    fn boolean(&self, col: &str, what: &str) -> Result<bool, DatastoreError>;
}

impl<R> StoredRow for R
where
    R: Row,
    R::Database: BoolColumn,
    for<'c> &'c str: ColumnIndex<R>,
    String: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    i64: for<'r> Decode<'r, R::Database> + Type<R::Database>,
{
    fn text(&self, col: &str) -> Result<String, DatastoreError> {
        Ok(self.try_get(col)?)
    }

    fn opt_text(&self, col: &str) -> Result<Option<String>, DatastoreError> {
        Ok(self.try_get(col)?)
    }

    fn int(&self, col: &str) -> Result<i64, DatastoreError> {
        Ok(self.try_get(col)?)
    }

    fn opt_int(&self, col: &str) -> Result<Option<i64>, DatastoreError> {
        Ok(self.try_get(col)?)
    }

    fn boolean(&self, col: &str, what: &str) -> Result<bool, DatastoreError> {
        R::Database::get_bool(self, col, what)
    }
}

/// A JSON list of plain strings (JWT audiences, DNS names), for [`stored_json_list`].
fn any_string(s: &str) -> Result<String, std::convert::Infallible> {
    Ok(s.to_owned())
}

/// An `entries` row (the columns of each backend's `select_entries!`).
pub(super) fn entry_from_row(row: &impl StoredRow) -> Result<RegistrationEntry, DatastoreError> {
    let id = row.text("id")?;
    let what = |col: &str| format!("entries[{id}].{col}");
    let spiffe_id = stored_spiffe_id_template(&row.text("spiffe_id")?, &what("spiffe_id"))?;
    let parent_id = stored_spiffe_id(&row.text("parent_id")?, &what("parent_id"))?;
    let selectors = stored_json_list(&row.text("selectors")?, &what("selectors"), Selector::parse)?;
    let ttl = |col: &str| -> Result<Option<Duration>, DatastoreError> {
        row.opt_int(col)?
            .map(|s| stored_u64(s, &what(col)).map(Duration::from_secs))
            .transpose()
    };
    let x509_svid_ttl = ttl("x509_svid_ttl_secs")?;
    let jwt_svid_ttl = ttl("jwt_svid_ttl_secs")?;
    let jwt_audiences = stored_json_list(
        &row.text("jwt_audiences")?,
        &what("jwt_audiences"),
        any_string,
    )?;
    let jwt_multi_audience = row.boolean("jwt_multi_audience", &what("jwt_multi_audience"))?;
    let dns_names = stored_json_list(&row.text("dns_names")?, &what("dns_names"), any_string)?;
    let hint = row.text("hint")?;
    let federates_with = stored_json_list(
        &row.text("federates_with")?,
        &what("federates_with"),
        TrustDomain::new,
    )?;
    let created_revision = stored_u64(row.int("created_revision")?, &what("created_revision"))?;
    let revision = stored_u64(row.int("revision")?, &what("revision"))?;
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

/// An `agents` row (the columns of each backend's `select_agents!`).
pub(super) fn agent_from_row(row: &impl StoredRow) -> Result<AttestedAgent, DatastoreError> {
    // An unparseable key cannot name its row; the message names the column only.
    let spiffe_id = stored_spiffe_id(&row.text("spiffe_id")?, "agents.spiffe_id")?;
    let what = |col: &str| format!("agents[{spiffe_id}].{col}");
    let time =
        |col: &str| -> Result<_, DatastoreError> { from_unix_secs(row.int(col)?, &what(col)) };
    Ok(AttestedAgent {
        attestation_type: row.text("attestation_type")?,
        serial: row.text("serial")?,
        previous_serial: row.opt_text("previous_serial")?,
        expires_at: time("expires_at")?,
        aliases: stored_json_list(&row.text("aliases")?, &what("aliases"), SpiffeId::parse)?,
        first_attested_at: time("first_attested_at")?,
        last_seen_at: time("last_seen_at")?,
        banned_at: row
            .opt_int("banned_at")?
            .map(|t| from_unix_secs(t, &what("banned_at")))
            .transpose()?,
        spiffe_id,
    })
}

/// A `bundles` row (`trust_domain, x509_authorities, jwt_authorities, sequence_number`).
pub(super) fn bundle_from_row(row: &impl StoredRow) -> Result<StoredBundle, DatastoreError> {
    let trust_domain = row.text("trust_domain")?;
    let what = |col: &str| format!("bundles[{trust_domain}].{col}");
    let x509_authorities = x509_authorities(row, &what)?;
    let jwt_authorities =
        stored_jwt_authorities(&row.text("jwt_authorities")?, &what("jwt_authorities"))?;
    let sequence_number = stored_u64(row.int("sequence_number")?, &what("sequence_number"))?;
    Ok(StoredBundle {
        trust_domain,
        x509_authorities,
        jwt_authorities,
        sequence_number,
    })
}

/// The `x509_authorities` column of a bundle or a contribution: a JSON list of hex DER.
fn x509_authorities(
    row: &impl StoredRow,
    what: &impl Fn(&str) -> String,
) -> Result<Vec<Vec<u8>>, DatastoreError> {
    stored_json_list(
        &row.text("x509_authorities")?,
        &what("x509_authorities"),
        |s| hex::decode(s),
    )
}

/// An `authority_contributions` row of `trust_domain`
/// (`server_id, x509_authorities, jwt_authorities, expires_at`).
pub(super) fn contribution_from_row(
    row: &impl StoredRow,
    trust_domain: &str,
) -> Result<AuthorityContribution, DatastoreError> {
    let server_id = row.text("server_id")?;
    let what = |col: &str| format!("authority_contributions[{trust_domain}/{server_id}].{col}");
    Ok(AuthorityContribution {
        trust_domain: trust_domain.to_owned(),
        x509_authorities: x509_authorities(row, &what)?,
        jwt_authorities: stored_jwt_authorities(
            &row.text("jwt_authorities")?,
            &what("jwt_authorities"),
        )?,
        expires_at: from_unix_secs(row.int("expires_at")?, &what("expires_at"))?,
        server_id,
    })
}

/// A `federation_relationships` row
/// (`trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id`).
pub(super) fn relationship_from_row(
    row: &impl StoredRow,
) -> Result<FederationRelationship, DatastoreError> {
    let raw = row.text("trust_domain")?;
    let trust_domain = TrustDomain::new(&raw).map_err(|e| {
        DatastoreError::Corrupt(format!(
            "federation_relationships.trust_domain: invalid trust domain: {e}"
        ))
    })?;
    let what = |col: &str| format!("federation_relationships[{trust_domain}].{col}");
    let profile = row.text("profile")?;
    let endpoint_id = row.opt_text("endpoint_spiffe_id")?;
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
        bundle_endpoint_url: row.text("bundle_endpoint_url")?,
        profile,
        trust_domain,
    })
}

/// A `changes` row (`revision, kind, object_id, scope`).
pub(super) fn change_from_row(row: &impl StoredRow) -> Result<Change, DatastoreError> {
    let revision = stored_u64(row.int("revision")?, "changes.revision")?;
    let kind = ChangeKind::from_stored(&row.text("kind")?).ok_or_else(|| {
        DatastoreError::Corrupt(format!("changes[{revision}].kind: unknown kind"))
    })?;
    let scope = serde_json::from_str(&row.text("scope")?).map_err(|_| {
        DatastoreError::Corrupt(format!(
            "changes[{revision}].scope: not a JSON list of strings"
        ))
    })?;
    Ok(Change {
        revision,
        kind,
        object_id: row.text("object_id")?,
        scope,
    })
}

/// A `revocations` row (`spiffe_id, revoked_at, expires_at, scope`) with its serials.
pub(super) fn revocation_from_row(
    row: &impl StoredRow,
    serials: Vec<String>,
) -> Result<Revocation, DatastoreError> {
    let spiffe_id = stored_spiffe_id(&row.text("spiffe_id")?, "revocations.spiffe_id")?;
    let what = |col: &str| format!("revocations[{spiffe_id}].{col}");
    Ok(Revocation {
        revoked_at: from_unix_secs(row.int("revoked_at")?, &what("revoked_at"))?,
        expires_at: from_unix_secs(row.int("expires_at")?, &what("expires_at"))?,
        scope: stored_json_list(&row.text("scope")?, &what("scope"), SpiffeId::parse)?,
        serials,
        spiffe_id,
    })
}

/// Every `revocations` row with its serials, given as `(spiffe_id, serial)` pairs in
/// the order each revocation lists them.
pub(super) fn revocations_with_serials(
    rows: &[impl StoredRow],
    serials: Vec<(String, String)>,
) -> Result<Vec<Revocation>, DatastoreError> {
    let mut by_id: HashMap<String, Vec<String>> = HashMap::new();
    for (id, serial) in serials {
        by_id.entry(id).or_default().push(serial);
    }
    rows.iter()
        .map(|row| {
            let serials = by_id.remove(&row.text("spiffe_id")?).unwrap_or_default();
            revocation_from_row(row, serials)
        })
        .collect()
}

/// The CRL entries of `(serial, revoked_at)` rows.
pub(super) fn revoked_serials(
    rows: Vec<(String, i64)>,
) -> Result<Vec<RevokedSerial>, DatastoreError> {
    rows.into_iter()
        .map(|(serial, revoked_at)| {
            let revoked_at =
                from_unix_secs(revoked_at, &format!("revocations[{serial}].revoked_at"))?;
            Ok(RevokedSerial { serial, revoked_at })
        })
        .collect()
}

/// The alias a consumed join token carried (`join_tokens.alias`).
pub(super) fn token_alias(
    id: &str,
    alias: Option<String>,
) -> Result<Option<SpiffeId>, DatastoreError> {
    alias
        .map(|a| stored_spiffe_id(&a, &format!("join_tokens[{id}].alias")))
        .transpose()
}

/// What the caller of an unconsumable join token is told, given the secret hash of the
/// expired unused token deleted for it (if any): "expired" only to a caller who holds
/// its secret, else [`TokenOutcome::Invalid`].
pub(super) fn unconsumable_outcome(
    expired_hash: Option<Vec<u8>>,
    secret_hash: &[u8; 32],
) -> TokenOutcome {
    match expired_hash {
        Some(hash) if hash.as_slice() == secret_hash.as_slice() => TokenOutcome::Expired,
        _ => TokenOutcome::Invalid,
    }
}

/// The bounds of the change feed, read in one transaction: the current revision and
/// `change_feed.pruned_through`.
pub(super) struct FeedBounds {
    current: u64,
    pruned_through: u64,
}

impl FeedBounds {
    /// The bounds from the current revision and the stored `pruned_through`.
    pub(super) fn new(current: u64, pruned_through: i64) -> Result<Self, DatastoreError> {
        Ok(Self {
            current,
            pruned_through: stored_u64(pruned_through, "change_feed.pruned_through")?,
        })
    }

    /// Whether the changes after `revision` cannot all be listed: some were pruned, or
    /// `revision` is ahead of the feed.
    pub(super) fn lacks_changes_after(&self, revision: u64) -> bool {
        revision > self.current || revision < self.pruned_through
    }

    /// The revision through which to prune to keep the latest `keep` revisions, for
    /// binding; `None` when nothing is left to prune.
    pub(super) fn prune_cutoff(&self, keep: u64) -> Result<Option<i64>, DatastoreError> {
        let cutoff = self.current.saturating_sub(keep);
        if cutoff <= self.pruned_through {
            return Ok(None);
        }
        revision_to_i64(cutoff).map(Some)
    }
}
