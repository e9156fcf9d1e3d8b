-- JWT-SVIDs: per-entry JWT parameters and the JWT authorities of bundles; and the scope
-- of each change, so that agents are told only about entries of their own parents.
--
-- Rows written before this migration get the defaults: server default JWT-SVID TTL,
-- any audience, one audience per token, and no JWT authorities.

-- NULL: the server's default JWT-SVID TTL.
ALTER TABLE entries ADD COLUMN jwt_svid_ttl_secs INTEGER
    CHECK (jwt_svid_ttl_secs IS NULL OR jwt_svid_ttl_secs >= 0);
-- JSON array of audience strings, sorted and deduplicated; empty: any audience.
ALTER TABLE entries ADD COLUMN jwt_audiences TEXT NOT NULL DEFAULT '[]';
-- 1: one JWT-SVID may carry several audiences.
ALTER TABLE entries ADD COLUMN jwt_multi_audience INTEGER NOT NULL DEFAULT 0
    CHECK (jwt_multi_audience IN (0, 1));

-- JSON array of {"kid": text, "public_key": hex SPKI DER, "expires_at": unix secs or null}.
ALTER TABLE bundles ADD COLUMN jwt_authorities TEXT NOT NULL DEFAULT '[]';

-- JSON array of the parent IDs an entry change concerns (old and new parent of an
-- update); empty: the change concerns every agent (bundles, agents). Changes recorded
-- before this migration concern every agent.
ALTER TABLE changes ADD COLUMN scope TEXT NOT NULL DEFAULT '[]';
