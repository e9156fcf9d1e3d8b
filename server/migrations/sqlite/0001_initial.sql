-- Initial schema of the tessera SQLite datastore.
--
-- Conventions: times are unix seconds (INTEGER); lists (selectors, DNS names, aliases,
-- bundle authorities) are JSON arrays of strings in TEXT columns; tables are STRICT so a
-- value of the wrong type is refused at write time. Later fields of registration
-- entries (jwt_svid_ttl, jwt audiences, federates_with, admin, downstream) and agent
-- bans arrive as nullable/defaulted columns in later migrations (ALTER TABLE ... ADD
-- COLUMN); never edit this file once released: add 0002_*.sql instead.

-- The change feed. Every write to entries, agents or bundles inserts one row here in
-- the same transaction; AUTOINCREMENT guarantees a revision is never reused, even after
-- the rows below it are pruned.
CREATE TABLE changes (
    revision    INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT    NOT NULL,
    object_id   TEXT    NOT NULL,
    recorded_at INTEGER NOT NULL
) STRICT;

-- One row: every change with revision <= pruned_through may have been pruned.
CREATE TABLE change_feed (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through INTEGER NOT NULL CHECK (pruned_through >= 0)
) STRICT;
INSERT INTO change_feed (id, pruned_through) VALUES (1, 0);

CREATE TABLE entries (
    id                 TEXT    PRIMARY KEY NOT NULL,
    spiffe_id          TEXT    NOT NULL,
    parent_id          TEXT    NOT NULL,
    -- JSON array of "type:value".
    selectors          TEXT    NOT NULL,
    -- (spiffe_id, parent_id, sorted selector set): two entries may not share it.
    similarity_key     TEXT    NOT NULL UNIQUE,
    -- NULL: the server's default X.509-SVID TTL.
    x509_svid_ttl_secs INTEGER CHECK (x509_svid_ttl_secs IS NULL OR x509_svid_ttl_secs >= 0),
    -- JSON array of DNS names.
    dns_names          TEXT    NOT NULL,
    hint               TEXT    NOT NULL DEFAULT '',
    created_revision   INTEGER NOT NULL,
    revision           INTEGER NOT NULL
) STRICT;
CREATE INDEX entries_parent_id ON entries (parent_id);
CREATE INDEX entries_spiffe_id ON entries (spiffe_id);

-- Join tokens: only the SHA-256 of the secret is stored.
CREATE TABLE join_tokens (
    id          TEXT    PRIMARY KEY NOT NULL,
    secret_hash BLOB    NOT NULL CHECK (length(secret_hash) = 32),
    alias       TEXT,
    expires_at  INTEGER NOT NULL,
    -- NULL until the token is consumed; a used token is kept (and refused).
    used_at     INTEGER
) STRICT;

CREATE TABLE agents (
    spiffe_id         TEXT    PRIMARY KEY NOT NULL,
    attestation_type  TEXT    NOT NULL,
    serial            TEXT    NOT NULL,
    -- Non-NULL exactly while `serial` has not been seen in use since the last renewal.
    previous_serial   TEXT,
    expires_at        INTEGER NOT NULL,
    -- JSON array of SPIFFE IDs.
    aliases           TEXT    NOT NULL,
    first_attested_at INTEGER NOT NULL,
    last_seen_at      INTEGER NOT NULL
) STRICT;

-- Bundles per trust domain (own and federated, never merged).
CREATE TABLE bundles (
    trust_domain     TEXT    PRIMARY KEY NOT NULL,
    -- JSON array of hex-encoded DER certificates.
    x509_authorities TEXT    NOT NULL,
    sequence_number  INTEGER NOT NULL CHECK (sequence_number >= 0),
    revision         INTEGER NOT NULL
) STRICT;
