//! Notes handlers: JSON in → domain → store → JSON out.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, LINK, TRANSFER_ENCODING};
use hyper::{Request, Response, StatusCode};
use serde_json::Value;
use tokio::time::Instant;

use super::list_cache::Page;
use super::{ApiError, AppState, Body, idempotency, json};
use crate::domain::{NewNote, NotePatch};
use crate::scoreboard::ext::{self, CacheEvent};
use crate::scoreboard::phase::{self, Step};
use crate::store::idempotency::{Claim, IdempotencyKey, Once, Stored};
use crate::store::notes::{Write, Written};

pub(crate) const DEFAULT_LIMIT: i64 = 50;
pub(crate) const MAX_LIMIT: i64 = 200;
/// A first guess at a note's JSON size, so the list's buffer rarely grows.
const LIST_BYTES_PER_NOTE: usize = 160;

/// `?limit=&before=`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListQuery {
    pub limit: i64,
    pub before: Option<i64>,
}

impl ListQuery {
    pub(crate) fn parse(query: Option<&str>) -> Result<ListQuery, ApiError> {
        let mut q = ListQuery {
            limit: DEFAULT_LIMIT,
            before: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "limit" => {
                    q.limit = v
                        .parse::<i64>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "limit must be an integer from 1 to {MAX_LIMIT}"
                            ))
                        })?;
                }
                "before" => {
                    q.before = Some(parse_id(v).ok_or_else(|| {
                        ApiError::BadRequest("before must be a note id (a positive integer)".into())
                    })?);
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// A note id: a positive integer that fits in i64.
pub(crate) fn parse_id(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i64>().ok().filter(|n| *n > 0)
}

pub(crate) async fn list(
    app: &AppState,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let q = ListQuery::parse(req.uri().query())?;
    let key = (q.limit, q.before);
    // All read before the query: see `list_cache` on why the order matters.
    let generation = app.slot.board().write_generation();
    let read_at = std::time::Instant::now();
    let cached = app.list_cache.get(key, generation, read_at);
    let token = if app.list_cache.enabled() {
        Some(app.list_cache.token(&app.store, read_at).await?)
    } else {
        None
    };
    if let (Some((page, read_with)), Some(now)) = (cached, &token)
        && read_with == *now
    {
        ext::cache(CacheEvent::Hit);
        return Ok(page_response(page));
    }
    if token.is_some() {
        ext::cache(CacheEvent::Miss);
    }
    let mut body = Vec::with_capacity(LIST_BYTES_PER_NOTE * q.limit as usize);
    let found = app.store.list_page(q.limit, q.before, &mut body).await?;
    let link = match found.last_id {
        Some(last) if found.more => HeaderValue::from_str(&format!(
            "</api/notes?limit={}&before={last}>; rel=\"next\"",
            q.limit
        ))
        .ok(),
        _ => None,
    };
    let page = Page {
        body: Bytes::from(body),
        link,
    };
    if let Some(token) = token {
        app.list_cache
            .put(key, generation, token, read_at, page.clone());
    }
    Ok(page_response(page))
}

fn page_response(page: Page) -> Response<Body> {
    let mut resp = super::json_response(StatusCode::OK, page.body);
    if let Some(link) = page.link {
        resp.headers_mut().insert(LINK, link);
    }
    resp
}

pub(crate) async fn create(
    app: &AppState,
    req: Request<Incoming>,
    deadline: Instant,
) -> Result<Response<Body>, ApiError> {
    let key = idempotency::key(req.headers())?;
    let value = read_json(app, req, deadline).await?;
    let note = NewNote::parse(&value)?;
    let claim = key.map(|k| app.claim(k, "POST", "/api/notes", Some(&value)));
    write(app, claim, Write::Create(&note), 0).await
}

fn not_found(id: i64) -> ApiError {
    ApiError::NotFound(format!("note {id} does not exist"))
}

pub(crate) async fn get(app: &AppState, id: i64) -> Result<Response<Body>, ApiError> {
    match app.store.get_note(id).await? {
        Some(n) => Ok(json(StatusCode::OK, &n)),
        None => Err(not_found(id)),
    }
}

pub(crate) async fn put(
    app: &AppState,
    id: i64,
    req: Request<Incoming>,
    deadline: Instant,
) -> Result<Response<Body>, ApiError> {
    let key = keyed_path(&req)?;
    let value = read_json(app, req, deadline).await?;
    let note = NewNote::parse(&value)?;
    let claim = key.map(|(k, path)| app.claim(k, "PUT", &path, Some(&value)));
    write(app, claim, Write::Put(id, &note), id).await
}

pub(crate) async fn patch(
    app: &AppState,
    id: i64,
    req: Request<Incoming>,
    deadline: Instant,
) -> Result<Response<Body>, ApiError> {
    let key = keyed_path(&req)?;
    let value = read_json(app, req, deadline).await?;
    let patch = NotePatch::parse(&value)?;
    let claim = key.map(|(k, path)| app.claim(k, "PATCH", &path, Some(&value)));
    write(app, claim, Write::Patch(id, &patch), id).await
}

pub(crate) async fn delete(
    app: &AppState,
    id: i64,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let claim =
        idempotency::key(req.headers())?.map(|k| app.claim(k, "DELETE", req.uri().path(), None));
    write(app, claim, Write::Delete(id), id).await
}

/// The request's `Idempotency-Key` and its path (kept before the body is
/// read, which takes the request); nothing is copied without a key.
fn keyed_path(req: &Request<Incoming>) -> Result<Option<(IdempotencyKey, String)>, ApiError> {
    Ok(idempotency::key(req.headers())?.map(|k| (k, req.uri().path().to_string())))
}

/// Do write `w` (on note `id`; 0 for a create): plain without a key, at
/// most once with one (see `store::idempotency`).
async fn write(
    app: &AppState,
    claim: Option<Claim>,
    w: Write<'_>,
    id: i64,
) -> Result<Response<Body>, ApiError> {
    // An empty patch writes nothing, so cached list pages stay good.
    let _writing = (!matches!(w, Write::Patch(_, p) if p.is_empty())).then(|| app.writing());
    let Some(claim) = claim else {
        let written = app.store.write(w).await?;
        return answer(&written, id).map(|a| idempotency::response(a, false));
    };
    let once = app
        .store
        .write_once(&claim, w, |written| {
            answer(written, id).unwrap_or_else(|e| idempotency::stored_error(&e))
        })
        .await?;
    match once {
        Once::Done(a) => Ok(idempotency::response(a, false)),
        Once::Replay(a) => Ok(idempotency::response(a, true)),
        Once::InProgress => Err(ApiError::KeyInUse),
        Once::Mismatch => Err(ApiError::KeyReused),
    }
}

/// What a write answers: 201 `{"id"}` + `Location`, 200 and the note, 204,
/// or 404 when there is no note `id`.
fn answer(written: &Written, id: i64) -> Result<Stored, ApiError> {
    let (status, body, location) = match written {
        Written::Created(new) => (
            StatusCode::CREATED,
            format!("{{\"id\":{new}}}").into_bytes(),
            Some(format!("/api/notes/{new}")),
        ),
        Written::Note(Some(n)) => (StatusCode::OK, super::json_bytes(n).to_vec(), None),
        Written::Deleted(true) => (StatusCode::NO_CONTENT, Vec::new(), None),
        Written::Note(None) | Written::Deleted(false) => return Err(not_found(id)),
    };
    Ok(Stored {
        status: status.as_u16(),
        body,
        location,
    })
}

/// Is this `Content-Type` JSON (`application/json`, any parameters, any case)?
pub(crate) fn is_json(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// The request body as JSON: 411, 413, 415, then 400 for anything unparsable.
///
/// A client that stops sending its body before `deadline` gets 408: the time
/// went to the client, not to us (the request timeout's 503 is for our side).
async fn read_json(
    app: &AppState,
    req: Request<Incoming>,
    deadline: Instant,
) -> Result<Value, ApiError> {
    let headers = req.headers();
    let declared = match headers.get(CONTENT_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("invalid Content-Length".into()))?,
        ),
        None => None,
    };
    if declared.is_none() && !headers.contains_key(TRANSFER_ENCODING) {
        return Err(ApiError::LengthRequired);
    }
    let max = app.max_body_bytes;
    if declared.is_some_and(|n| n > max) {
        return Err(ApiError::TooLarge(max));
    }
    if !is_json(headers.get(CONTENT_TYPE)) {
        return Err(ApiError::UnsupportedMediaType);
    }
    phase::enter(Step::ReadingBody, None);
    let collected = tokio::time::timeout_at(
        deadline,
        Limited::new(req.into_body(), max as usize).collect(),
    )
    .await;
    phase::enter(Step::Handling, None);
    let collected = collected.map_err(|_| ApiError::RequestTimeout)?;
    let bytes = collected
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::TooLarge(max)
            } else {
                ApiError::BadRequest(format!("could not read the request body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_validation() {
        assert_eq!(
            ListQuery::parse(None).expect("default"),
            ListQuery {
                limit: 50,
                before: None
            }
        );
        let q = ListQuery::parse(Some("limit=200&before=7&x=y")).expect("ok");
        assert_eq!((q.limit, q.before), (200, Some(7)));
        for bad in [
            "limit=0",
            "limit=201",
            "limit=abc",
            "limit=",
            "before=-1",
            "before=0",
            "before=x",
        ] {
            assert!(ListQuery::parse(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids() {
        assert_eq!(parse_id("42"), Some(42));
        assert_eq!(parse_id("9223372036854775807"), Some(i64::MAX));
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            "1.0",
            "99999999999999999999",
            "9223372036854775808",
            "1e3",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn json_content_types() {
        let ok = |s: &'static str| is_json(Some(&HeaderValue::from_static(s)));
        assert!(ok("application/json"));
        assert!(ok("Application/JSON; charset=utf-8"));
        assert!(!ok("text/plain"));
        assert!(!ok("application/jsonx"));
        assert!(!is_json(None));
    }
}
