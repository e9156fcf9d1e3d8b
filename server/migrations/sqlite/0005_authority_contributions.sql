-- Several servers of one trust domain may share a datastore, each with its own CA and
-- JWT key. Each server stores its own keys here; the trust domain's row in `bundles`
-- is rebuilt from all of them (`Datastore::publish_authorities`).

CREATE TABLE authority_contributions (
    trust_domain     TEXT    NOT NULL,
    -- The server's instance id from its rotation journal.
    server_id        TEXT    NOT NULL,
    -- JSON array of hex DER certificates, in the server's order.
    x509_authorities TEXT    NOT NULL,
    -- JSON array as in `bundles.jwt_authorities`.
    jwt_authorities  TEXT    NOT NULL,
    -- Unix seconds: the contribution is dropped after this unless published again.
    expires_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    PRIMARY KEY (trust_domain, server_id)
) STRICT;
