//! Request bodies: any bytes → JSON → NewNote / NotePatch. Must never panic;
//! whatever parses must respect the domain rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notesd::domain::{NewNote, NotePatch, TITLE_MAX_CHARS};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(n) = NewNote::parse(&value) {
        let chars = n.title.as_str().chars().count();
        assert!((1..=TITLE_MAX_CHARS).contains(&chars));
        assert!(!n.body.as_deref().unwrap_or("").contains('\0'));
    }
    if let Ok(p) = NotePatch::parse(&value)
        && let Some(t) = p.title
    {
        assert!(t.as_str().chars().count() <= TITLE_MAX_CHARS);
    }
});
