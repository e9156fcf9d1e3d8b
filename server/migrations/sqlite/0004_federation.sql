-- Federation: the trust domains an entry federates with, and the federation
-- relationships whose bundle endpoints the server polls. Federated bundles themselves
-- live in `bundles`, one row per trust domain (never merged).
--
-- Entries written before this migration federate with no trust domain.

-- JSON array of trust domain names, sorted and deduplicated.
ALTER TABLE entries ADD COLUMN federates_with TEXT NOT NULL DEFAULT '[]';

CREATE TABLE federation_relationships (
    -- The federated trust domain's name, e.g. `example-federated.org`.
    trust_domain        TEXT    PRIMARY KEY NOT NULL,
    -- An https:// URL (checked before it is stored).
    bundle_endpoint_url TEXT    NOT NULL,
    profile             TEXT    NOT NULL CHECK (profile IN ('https_web', 'https_spiffe')),
    -- https_spiffe: the SPIFFE ID the endpoint must present; NULL for https_web.
    endpoint_spiffe_id  TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
) STRICT;
