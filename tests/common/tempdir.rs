//! Temp dirs: one fresh directory per test server (or other fixture).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory directly under /tmp (unix socket paths must stay < 108
/// bytes). Removed on drop, unless the thread is panicking (kept for post-mortem).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let n = DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let short: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(20)
            .collect();
        let path = PathBuf::from(format!("/tmp/nd-{}-{}-{}", std::process::id(), n, short));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("(test dir kept for inspection: {})", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}
