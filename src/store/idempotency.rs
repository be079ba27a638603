//! `Idempotency-Key`: a write done at most once per key, its first answer
//! given again to every retry (draft-ietf-httpapi-idempotency-key-header).
//!
//! # Layout
//!
//! One row per key in `idempotency_keys` (migration 0002): the request's
//! [`fingerprint`], the answer (status, body, `Location`) and when it
//! expires. [`super::Store::write_once`] runs, in one transaction:
//!
//! 1. **claim**: `INSERT … ON CONFLICT DO UPDATE … WHERE expired`: the
//!    primary key, not a check-then-insert, decides which of two concurrent
//!    duplicates goes on. On PostgreSQL a transaction-scoped advisory lock on
//!    the key's hash is tried first, so a duplicate of a request still
//!    running is told so at once (409) instead of waiting on its row; on
//!    SQLite `BEGIN IMMEDIATE` queues it behind the first, which it then
//!    finds answered.
//! 2. **write** the note (the same statements as a plain write);
//! 3. **answer**: the caller's HTTP answer is stored with the key;
//! 4. **commit**: note and answer together, or neither (a worker or host
//!    lost midway leaves no claim behind to block the retry).
//!
//! A key already answered is looked up: the same fingerprint gets the
//! stored answer ([`Once::Replay`]), another one [`Once::Mismatch`]. Keys
//! expire after `http.idempotency_ttl`; an expired key is claimed afresh,
//! and the workers purge expired rows in small batches.

use sha2::{Digest, Sha256};

/// A validated key: 1–255 bytes of visible ASCII.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdempotencyKey(String);

/// The longest key taken (the draft leaves it to the server; Stripe's limit).
pub(crate) const MAX_KEY_BYTES: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("Idempotency-Key is empty")]
    Empty,
    #[error("Idempotency-Key is longer than {MAX_KEY_BYTES} bytes ({0})")]
    TooLong(usize),
    #[error("Idempotency-Key must be visible ASCII (a string, optionally in double quotes)")]
    NotText,
    #[error("more than one Idempotency-Key header")]
    Several,
}

impl IdempotencyKey {
    /// The header's value: a key as is, or as a structured-field string
    /// (`"…"`, as the draft writes it); the quotes are not part of the key.
    pub(crate) fn parse(raw: &[u8]) -> Result<IdempotencyKey, KeyError> {
        let text = std::str::from_utf8(raw).map_err(|_| KeyError::NotText)?;
        let text = text.trim();
        let key = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(text);
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(KeyError::NotText);
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong(key.len()));
        }
        Ok(IdempotencyKey(key.to_string()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// What identifies "the same request" under one key: SHA-256 of the method,
/// the path and the body as canonical JSON (keys sorted, no whitespace), so
/// a retry that re-encodes the same document is still the same request.
pub(crate) fn fingerprint(method: &str, path: &str, body: Option<&serde_json::Value>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update([0]);
    h.update(path.as_bytes());
    h.update([0]);
    if let Some(body) = body {
        // serde_json's map is ordered by key: its encoding is canonical.
        h.update(serde_json::to_vec(body).unwrap_or_default());
    }
    h.finalize().into()
}

/// A key with the request it stands for and how long it is kept.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    pub key: IdempotencyKey,
    pub fingerprint: [u8; 32],
    pub ttl_secs: i64,
}

/// An answer as it is stored and given again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub status: u16,
    pub body: Vec<u8>,
    pub location: Option<String>,
}

/// How a keyed write ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Once {
    /// Written now, with this answer (stored with the key).
    Done(Stored),
    /// Answered before: the same answer again.
    Replay(Stored),
    /// The key is held by a request still running (or vanished between two
    /// statements): retry later.
    InProgress,
    /// The key was used for another request.
    Mismatch,
}

impl Claim {
    /// What a key found already in the table means for this request.
    pub(crate) fn compare(
        &self,
        fingerprint: Vec<u8>,
        status: Option<i32>,
        body: Option<Vec<u8>>,
        location: Option<String>,
    ) -> Once {
        if fingerprint != self.fingerprint {
            return Once::Mismatch;
        }
        match status.and_then(|s| u16::try_from(s).ok()) {
            Some(status) => Once::Replay(Stored {
                status,
                body: body.unwrap_or_default(),
                location,
            }),
            None => Once::InProgress,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_1_to_255_visible_bytes_quotes_optional() {
        let ok = |s: &str| IdempotencyKey::parse(s.as_bytes()).map(|k| k.0);
        assert_eq!(ok("abc-123").as_deref(), Ok("abc-123"));
        assert_eq!(ok("\"8e03978e-40d5\"").as_deref(), Ok("8e03978e-40d5"));
        assert_eq!(ok(&"k".repeat(255)).map(|k| k.len()), Ok(255));
        assert_eq!(ok(&"k".repeat(256)), Err(KeyError::TooLong(256)));
        assert_eq!(ok(""), Err(KeyError::Empty));
        assert_eq!(ok("\"\""), Err(KeyError::Empty));
        assert_eq!(ok("a\tb"), Err(KeyError::NotText));
        assert_eq!(IdempotencyKey::parse(&[0xff, 0x41]), Err(KeyError::NotText));
    }

    #[test]
    fn fingerprints_see_the_document_not_its_encoding() {
        let a = json!({"title": "t", "body": "b"});
        let b: serde_json::Value =
            serde_json::from_str("{ \"body\" : \"b\",\n \"title\":\"t\" }").expect("json");
        assert_eq!(
            fingerprint("POST", "/api/notes", Some(&a)),
            fingerprint("POST", "/api/notes", Some(&b))
        );
        let other = json!({"title": "t", "body": "c"});
        assert_ne!(
            fingerprint("POST", "/api/notes", Some(&a)),
            fingerprint("POST", "/api/notes", Some(&other))
        );
        assert_ne!(
            fingerprint("PUT", "/api/notes/1", Some(&a)),
            fingerprint("PUT", "/api/notes/2", Some(&a))
        );
        assert_ne!(
            fingerprint("DELETE", "/api/notes/1", None),
            fingerprint("PUT", "/api/notes/1", None)
        );
    }

    #[test]
    fn a_found_key_replays_only_for_the_same_request() {
        let claim = Claim {
            key: IdempotencyKey("k".into()),
            fingerprint: [7; 32],
            ttl_secs: 60,
        };
        let stored = Stored {
            status: 201,
            body: b"{\"id\":5}".to_vec(),
            location: Some("/api/notes/5".into()),
        };
        assert_eq!(
            claim.compare(
                vec![7; 32],
                Some(201),
                Some(stored.body.clone()),
                stored.location.clone()
            ),
            Once::Replay(stored)
        );
        assert_eq!(
            claim.compare(vec![8; 32], Some(201), None, None),
            Once::Mismatch
        );
        assert_eq!(
            claim.compare(vec![7; 32], None, None, None),
            Once::InProgress
        );
    }
}
