-- notesd: backward-compatible
-- Idempotency-Key (docs/design.md §5b): one row per key, claimed and
-- answered in the transaction of the write it guards, so a key's note and
-- its stored answer commit together or not at all. A new table only: a
-- binary from before it keeps serving the database (and ignores the header).
CREATE TABLE idempotency_keys (
    key          TEXT PRIMARY KEY CHECK (octet_length(key) BETWEEN 1 AND 255),
    -- SHA-256 of the method, the path and the canonical JSON body.
    fingerprint  BYTEA NOT NULL,
    -- The first answer: NULL only inside the transaction that claims the key.
    status       INTEGER,
    body         BYTEA,
    location     TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at   TIMESTAMPTZ NOT NULL
);

CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
