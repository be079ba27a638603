CREATE TABLE notes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    title       VARCHAR(160) NOT NULL CHECK (length(title) BETWEEN 1 AND 160),
    body        TEXT,
    -- RFC 3339 UTC with microseconds: sorts as text, prints as is.
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX notes_created_at_idx ON notes (created_at DESC, id DESC);
