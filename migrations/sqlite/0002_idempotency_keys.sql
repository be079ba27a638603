-- notesd: backward-compatible
-- Idempotency-Key (docs/design.md §5b): one row per key, claimed and
-- answered in the transaction of the write it guards, so a key's note and
-- its stored answer commit together or not at all. A new table only: a
-- binary from before it keeps serving the database (and ignores the header).
CREATE TABLE idempotency_keys (
    key          TEXT PRIMARY KEY CHECK (length(CAST(key AS BLOB)) BETWEEN 1 AND 255),
    -- SHA-256 of the method, the path and the canonical JSON body.
    fingerprint  BLOB NOT NULL,
    -- The first answer: NULL only inside the transaction that claims the key.
    status       INTEGER,
    body         BLOB,
    location     TEXT,
    -- Unix seconds.
    created_at   INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER)),
    expires_at   INTEGER NOT NULL
);

CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
