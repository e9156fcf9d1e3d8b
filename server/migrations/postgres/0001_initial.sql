-- Schema of the tessera PostgreSQL datastore: the SQLite schema after its migration
-- 0005, in PostgreSQL types. Same tables, columns and meaning; see
-- server/migrations/sqlite/ for the history of each column.
--
-- Conventions: times are unix seconds (BIGINT); lists (selectors, DNS names, aliases,
-- bundle authorities, scopes) are JSON arrays in TEXT columns, exactly as in SQLite
-- (TEXT, not JSONB: JSONB refuses the escaped NUL `\u0000` that serde_json may write,
-- and the code parses the JSON itself anyway). Keys, and the columns that lists are
-- ordered by, use the "C" collation, so that `ORDER BY` sorts bytewise like SQLite
-- whatever the database's default collation is. Never edit this file once released: add
-- 0002_*.sql instead.

-- The change feed. Every write to entries, agents, bundles, federation relationships
-- or revocations inserts one row here in the same transaction. The revision is
-- assigned by the datastore as one more than the current revision while it holds the
-- change-feed lock (an advisory lock: see server/src/datastore/postgres.rs), not by a
-- sequence: sequences are not transactional, so a sequence would leave gaps and could
-- let revision 11 commit before revision 10.
CREATE TABLE changes (
    revision    BIGINT  PRIMARY KEY CHECK (revision > 0),
    kind        TEXT    NOT NULL,
    object_id   TEXT    NOT NULL,
    recorded_at BIGINT  NOT NULL,
    -- JSON array of the agent IDs (or aliases) the change concerns; empty: every agent.
    scope       TEXT    NOT NULL DEFAULT '[]'
);

-- Tells the servers listening on the channel `tessera_changes` that a change was
-- recorded; PostgreSQL delivers it when (and only if) the transaction commits.
CREATE FUNCTION tessera_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tessera_changes', NEW.revision::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_notify AFTER INSERT ON changes
    FOR EACH ROW EXECUTE FUNCTION tessera_notify_change();

-- One row: every change with revision <= pruned_through may have been pruned.
CREATE TABLE change_feed (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through BIGINT  NOT NULL CHECK (pruned_through >= 0)
);
INSERT INTO change_feed (id, pruned_through) VALUES (1, 0);

CREATE TABLE entries (
    id                 TEXT COLLATE "C" PRIMARY KEY,
    spiffe_id          TEXT COLLATE "C" NOT NULL,
    parent_id          TEXT COLLATE "C" NOT NULL,
    -- JSON array of "type:value".
    selectors          TEXT    NOT NULL,
    -- (spiffe_id, parent_id, sorted selector set): two entries may not share it.
    similarity_key     TEXT COLLATE "C" NOT NULL,
    -- NULL: the server's default X.509-SVID TTL.
    x509_svid_ttl_secs BIGINT  CHECK (x509_svid_ttl_secs IS NULL OR x509_svid_ttl_secs >= 0),
    -- NULL: the server's default JWT-SVID TTL.
    jwt_svid_ttl_secs  BIGINT  CHECK (jwt_svid_ttl_secs IS NULL OR jwt_svid_ttl_secs >= 0),
    -- JSON array of audience strings, sorted and deduplicated; empty: any audience.
    jwt_audiences      TEXT    NOT NULL DEFAULT '[]',
    -- One JWT-SVID may carry several audiences.
    jwt_multi_audience BOOLEAN NOT NULL DEFAULT FALSE,
    -- JSON array of DNS names.
    dns_names          TEXT    NOT NULL,
    hint               TEXT    NOT NULL DEFAULT '',
    -- JSON array of trust domain names, sorted and deduplicated.
    federates_with     TEXT    NOT NULL DEFAULT '[]',
    created_revision   BIGINT  NOT NULL,
    revision           BIGINT  NOT NULL,
    -- UNIQUE (similarity_key) through a hash index: a B-tree entry is limited to about
    -- 2.7 kB, which an entry with many long selectors would exceed; a hash index keeps
    -- only the hash and rechecks equality, so the uniqueness stays exact.
    CONSTRAINT entries_similarity_key_unique EXCLUDE USING hash (similarity_key WITH =)
);
CREATE INDEX entries_parent_id ON entries (parent_id);
CREATE INDEX entries_spiffe_id ON entries (spiffe_id);

-- Join tokens: only the SHA-256 of the secret is stored.
CREATE TABLE join_tokens (
    id          TEXT COLLATE "C" PRIMARY KEY,
    secret_hash BYTEA   NOT NULL CHECK (octet_length(secret_hash) = 32),
    alias       TEXT,
    expires_at  BIGINT  NOT NULL,
    -- NULL until the token is consumed; a used token is kept (and refused).
    used_at     BIGINT
);

CREATE TABLE agents (
    spiffe_id         TEXT COLLATE "C" PRIMARY KEY,
    attestation_type  TEXT    NOT NULL,
    serial            TEXT    NOT NULL,
    -- Non-NULL exactly while `serial` has not been seen in use since the last renewal.
    previous_serial   TEXT,
    expires_at        BIGINT  NOT NULL,
    -- JSON array of SPIFFE IDs.
    aliases           TEXT    NOT NULL,
    first_attested_at BIGINT  NOT NULL,
    last_seen_at      BIGINT  NOT NULL,
    -- Unix seconds of the ban; NULL: not banned. A banned agent's row is kept so that
    -- its ID cannot attest again; evicting it deletes the row (and so lifts the ban).
    banned_at         BIGINT
);

-- Bundles per trust domain (own and federated, never merged).
CREATE TABLE bundles (
    trust_domain     TEXT COLLATE "C" PRIMARY KEY,
    -- JSON array of hex-encoded DER certificates.
    x509_authorities TEXT    NOT NULL,
    -- JSON array of {"kid": text, "public_key": hex SPKI DER, "expires_at": unix secs or null}.
    jwt_authorities  TEXT    NOT NULL DEFAULT '[]',
    sequence_number  BIGINT  NOT NULL CHECK (sequence_number >= 0),
    revision         BIGINT  NOT NULL
);

-- Rendered SPIFFE IDs (instances of templated entries) that no agent may serve and the
-- server never signs again, until `expires_at`, after which no SVID of the ID can still
-- be valid and the row is pruned.
CREATE TABLE revocations (
    spiffe_id  TEXT COLLATE "C" PRIMARY KEY,
    revoked_at BIGINT  NOT NULL,
    expires_at BIGINT  NOT NULL,
    -- JSON array of the parent IDs of the entries the ID instantiated: the agents that
    -- are told about the revocation.
    scope      TEXT    NOT NULL
);
CREATE INDEX revocations_expires_at ON revocations (expires_at);

-- Serials of the X.509-SVIDs signed for templated entries, so that revoking an instance
-- can list them in the CRL. Pruned once the certificate has expired.
CREATE TABLE instance_svids (
    -- Lowercase hex without leading zeros.
    serial     TEXT COLLATE "C" PRIMARY KEY,
    spiffe_id  TEXT COLLATE "C" NOT NULL,
    expires_at BIGINT  NOT NULL
);
CREATE INDEX instance_svids_spiffe_id ON instance_svids (spiffe_id);
CREATE INDEX instance_svids_expires_at ON instance_svids (expires_at);

CREATE TABLE federation_relationships (
    -- The federated trust domain's name, e.g. `example-federated.org`.
    trust_domain        TEXT COLLATE "C" PRIMARY KEY,
    -- An https:// URL (checked before it is stored).
    bundle_endpoint_url TEXT    NOT NULL,
    profile             TEXT    NOT NULL CHECK (profile IN ('https_web', 'https_spiffe')),
    -- https_spiffe: the SPIFFE ID the endpoint must present; NULL for https_web.
    endpoint_spiffe_id  TEXT,
    created_at          BIGINT  NOT NULL,
    updated_at          BIGINT  NOT NULL
);

-- Several servers of one trust domain share the database, each with its own CA and JWT
-- key. Each server stores its own keys here; the trust domain's row in `bundles` is
-- rebuilt from all of them (`Datastore::publish_authorities`).
CREATE TABLE authority_contributions (
    trust_domain     TEXT COLLATE "C" NOT NULL,
    -- The server's instance id from its rotation journal.
    server_id        TEXT COLLATE "C" NOT NULL,
    -- JSON array of hex DER certificates, in the server's order.
    x509_authorities TEXT    NOT NULL,
    -- JSON array as in `bundles.jwt_authorities`.
    jwt_authorities  TEXT    NOT NULL,
    -- Unix seconds: the contribution is dropped after this unless published again.
    expires_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    PRIMARY KEY (trust_domain, server_id)
);
