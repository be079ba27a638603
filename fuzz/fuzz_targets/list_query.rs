//! Query strings and path ids: never panic; accepted values are in range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notesd::http::notes::{ListQuery, MAX_LIMIT, parse_id};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(q) = ListQuery::parse(Some(s)) {
        assert!((1..=MAX_LIMIT).contains(&q.limit));
        assert!(q.before.is_none_or(|b| b > 0));
    }
    if let Some(id) = parse_id(s) {
        assert!(id > 0);
    }
    let _ = notesd::http::route_index(s);
});
