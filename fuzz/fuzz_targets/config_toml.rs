//! Config files: any text → parse + validate. Never panics; a config that
//! parses and validates has a bind list and sane numbers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notesd::config::{Config, Source};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Config::from_toml(s, Source::Embedded)
        && c.validate().is_empty()
    {
        assert!(!c.binds().is_empty());
        assert!(c.worker_count() >= 1);
    }
});
