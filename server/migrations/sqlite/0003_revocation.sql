-- Agent bans and instance revocation (issue 6).
--
-- Rows written before this migration: no agent is banned, nothing is revoked, and no
-- instance serial is known (SVIDs signed before it cannot appear in a CRL; they expire
-- within their TTL).

-- Unix seconds of the ban; NULL: not banned. A banned agent's row is kept so that its
-- ID cannot attest again; evicting it deletes the row (and so lifts the ban).
ALTER TABLE agents ADD COLUMN banned_at INTEGER;

-- Rendered SPIFFE IDs (instances of templated entries) that no agent may serve and the
-- server never signs again, until `expires_at`, after which no SVID of the ID can still
-- be valid and the row is pruned.
CREATE TABLE revocations (
    spiffe_id  TEXT    PRIMARY KEY NOT NULL,
    revoked_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    -- JSON array of the parent IDs of the entries the ID instantiated: the agents that
    -- are told about the revocation.
    scope      TEXT    NOT NULL
) STRICT;
CREATE INDEX revocations_expires_at ON revocations (expires_at);

-- Serials of the X.509-SVIDs signed for templated entries, so that revoking an instance
-- can list them in the CRL. Pruned once the certificate has expired.
CREATE TABLE instance_svids (
    -- Lowercase hex without leading zeros.
    serial     TEXT    PRIMARY KEY NOT NULL,
    spiffe_id  TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;
CREATE INDEX instance_svids_spiffe_id ON instance_svids (spiffe_id);
CREATE INDEX instance_svids_expires_at ON instance_svids (expires_at);
