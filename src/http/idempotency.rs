//! The `Idempotency-Key` request header on writes, and the answers it
//! stores and gives again (the store side: `store::idempotency`).

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION};
use hyper::{Response, StatusCode};

use super::{ApiError, Body};
use crate::store::idempotency::{IdempotencyKey, Stored};

pub(crate) const KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on an answer given again for a retry.
pub(crate) const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The request's key, if it has one; 400 for a bad one (empty, over 255
/// bytes, not text, or several headers).
pub(crate) fn key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = headers.get_all(KEY).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let parsed = if values.next().is_some() {
        Err(crate::store::idempotency::KeyError::Several)
    } else {
        IdempotencyKey::parse(first.as_bytes())
    };
    parsed
        .map(Some)
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// An answer as stored: what an error answers (a key's answer may be a 404).
pub(crate) fn stored_error(e: &ApiError) -> Stored {
    Stored {
        status: e.status().as_u16(),
        body: e.body().to_vec(),
        location: None,
    }
}

/// The response for an answer, first given or `replayed`.
pub(crate) fn response(stored: Stored, replayed: bool) -> Response<Body> {
    let empty = stored.body.is_empty();
    let mut resp = Response::new(Full::new(Bytes::from(stored.body)));
    *resp.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let headers = resp.headers_mut();
    if !empty {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if let Some(v) = stored
        .location
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        headers.insert(LOCATION, v);
    }
    if replayed {
        headers.insert(REPLAYED, HeaderValue::from_static("true"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_optional_and_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(key(&h).expect("none"), None);
        h.insert(KEY, HeaderValue::from_static("abc"));
        assert_eq!(
            key(&h).expect("one").map(|k| k.as_str().to_string()),
            Some("abc".into())
        );
        h.append(KEY, HeaderValue::from_static("def"));
        assert!(matches!(key(&h), Err(ApiError::BadRequest(_))));
        let mut long = HeaderMap::new();
        long.insert(
            KEY,
            HeaderValue::from_str(&"x".repeat(256)).expect("header"),
        );
        assert!(matches!(key(&long), Err(ApiError::BadRequest(m)) if m.contains("255")));
    }

    #[test]
    fn a_replay_is_the_stored_answer_marked() {
        let r = response(
            Stored {
                status: 201,
                body: b"{\"id\":3}".to_vec(),
                location: Some("/api/notes/3".into()),
            },
            true,
        );
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()[LOCATION], "/api/notes/3");
        assert_eq!(r.headers()[REPLAYED], "true");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        let deleted = response(
            Stored {
                status: 204,
                body: Vec::new(),
                location: None,
            },
            false,
        );
        assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
        assert!(deleted.headers().get(CONTENT_TYPE).is_none());
        assert!(deleted.headers().get(REPLAYED).is_none());
    }
}
