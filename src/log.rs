//! Logging: tracing to journald, a file, or stderr; text or JSON.
//!
//! `log.target = "auto"` logs to journald when stderr *is* the journal
//! (`JOURNAL_STREAM` names stderr's device and inode), else to stderr.
//! `"journald"` insists, falling back to stderr with a warning when no journal
//! is there. `log.file`, when set, wins: lines are appended to it and USR1
//! reopens it (for logrotate). Every line carries the process role and pid
//! through a root span entered for the process' lifetime (which libraries do
//! not see as the current span: [`NoCurrentSpan`]).
//!
//! In the journal, access lines (target [`ACCESS_TARGET`]) go with priority 7
//! (debug) and identifier `notesd-access`; everything else with the usual
//! priorities (info → 5, notice) and identifier `notesd`. journald rate-limits
//! each unit per priority class, so a flood of access lines under load uses up
//! only the debug class and can never cost the master's lifecycle lines
//! ("reload complete", timeouts, boot failures).

use std::any::TypeId;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tracing::level_filters::LevelFilter;
use tracing::subscriber::{Interest, Subscriber};
use tracing::{Event, Metadata, span};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogConfig;

/// The tracing target of the per-request access lines.
pub const ACCESS_TARGET: &str = "access";

/// At most one line a second from one call site of one process, for lines a
/// request can cause (a database outage at 10,000 requests a second would
/// otherwise log 10,000 warnings a second and use up journald's budget for
/// the unit's warnings, the master's included). The first occurrence in a
/// second is logged, with how many were skipped since the last one logged.
pub struct Throttle {
    /// The second (monotonic, + 1) of the last line logged; 0 = never.
    second: AtomicU64,
    skipped: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            second: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// `Some(skipped)` if this occurrence is to be logged, else `None` (counted).
    pub fn admit(&self, now: std::time::Duration) -> Option<u64> {
        let second = now.as_secs() + 1;
        if self.second.swap(second, Ordering::Relaxed) == second {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            None
        } else {
            Some(self.skipped.swap(0, Ordering::Relaxed))
        }
    }
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle::new()
    }
}

/// " (N more since)" for a throttled line, or nothing.
pub fn skipped_note(skipped: u64) -> String {
    if skipped == 0 {
        String::new()
    } else {
        format!(" ({skipped} more like it since the last one logged)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open log file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("log.level {0:?} is not a valid filter")]
    Level(String),
    #[error("a global logger is already installed")]
    AlreadySet,
}

/// The reopenable log file, shared by every writer.
struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

static LOG_FILE: OnceLock<LogFile> = OnceLock::new();

fn open_append(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LogError::File {
            path: path.to_path_buf(),
            source,
        })
}

/// USR1: reopen the log file (after logrotate moved it). No-op without one.
pub fn reopen() {
    if let Some(lf) = LOG_FILE.get() {
        match open_append(&lf.path) {
            Ok(f) => {
                if let Ok(mut guard) = lf.file.lock() {
                    *guard = f;
                }
                tracing::info!("log file {} reopened", lf.path.display());
            }
            Err(e) => {
                tracing::error!("cannot reopen the log file, still writing to the old one: {e}")
            }
        }
    }
}

#[derive(Clone, Copy)]
struct FileWriter;

/// Log lines this process could not write to `log.file` (a full disk, an
/// I/O error): dropped, never waited for, never retried; the next line
/// tries again, so logging resumes by itself once there is room.
static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Lines this process dropped so far (see [`DROPPED`]).
pub fn dropped_lines() -> u64 {
    DROPPED.load(std::sync::atomic::Ordering::Relaxed)
}

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = match LOG_FILE.get().map(|lf| lf.file.lock()) {
            Some(Ok(mut f)) => f.write_all(buf),
            _ => io::stderr().write_all(buf),
        };
        if written.is_err() {
            // Counted, not reported: an error per line would go to stderr
            // (the journal) exactly when the disk under the log is full.
            DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::scoreboard::ext::log_dropped();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for FileWriter {
    type Writer = FileWriter;
    fn make_writer(&'a self) -> FileWriter {
        *self
    }
}

/// Is stderr connected to the journal (systemd's JOURNAL_STREAM=dev:ino)?
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(meta) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.st_dev) && ino.parse::<u64>().ok() == Some(meta.st_ino)
}

/// The output layer sits under one global filter: disabled callsites (sqlx's
/// per-query debug spans, for instance) are then skipped at the callsite, with
/// no per-event or per-span work on the request path.
type Filtered = tracing_subscriber::layer::Layered<EnvFilter, tracing_subscriber::Registry>;
type BoxLayer = Box<dyn Layer<Filtered> + Send + Sync>;

fn fmt_layer<W>(json: bool, writer: W, ansi: bool) -> BoxLayer
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed()
    }
}

/// Two journald writers: access lines at priority 7 as `notesd-access`, the
/// rest at the usual priorities as `notesd` (see the module doc for why).
/// Fields keep their own names, upper-cased (`REQUEST_ID`, `WCHAN`,
/// `ELAPSED_MS`…), not tracing-journald's default `F_` prefix, so that
/// `journalctl -u notesd REQUEST_ID=…` finds a request; none of them is one
/// of journald's own (`MESSAGE`, `PRIORITY`, `SYSLOG_IDENTIFIER`, `CODE_*`).
fn journald_layer() -> io::Result<BoxLayer> {
    use tracing_journald::{Priority, PriorityMappings};
    use tracing_subscriber::filter::filter_fn;
    let lifecycle = tracing_journald::layer()?
        .with_syslog_identifier("notesd".into())
        .with_field_prefix(None)
        .with_filter(filter_fn(|m| m.target() != ACCESS_TARGET));
    let access = tracing_journald::layer()?
        .with_syslog_identifier("notesd-access".into())
        .with_field_prefix(None)
        .with_priority_mappings(PriorityMappings {
            info: Priority::Debug,
            ..PriorityMappings::new()
        })
        .with_filter(filter_fn(|m| m.target() == ACCESS_TARGET));
    Ok(lifecycle.and_then(access).boxed())
}

/// The installed subscriber, except that it answers "no span" when asked for
/// the current one by [`tracing::Span::current`].
///
/// Why. Each process enters its role span (`master{pid}` / `worker{pid
/// generation}`) for its whole life, so it is always the current span.
/// sqlx wraps every query stream in `in_current_span()`, and so entered and
/// left that span around every poll of the stream — once per row: a list
/// page of 50 notes spent an eighth of its CPU in the subscriber's enter and
/// exit. With no current span to capture, the streams carry none.
///
/// Log lines are unchanged: the layers find an event's spans through the
/// registry (`Context::lookup_current`), which this does not touch, and new
/// spans still get their contextual parent from the registry.
struct NoCurrentSpan<S>(S);

impl<S: Subscriber> Subscriber for NoCurrentSpan<S> {
    fn current_span(&self) -> tracing_core::span::Current {
        tracing_core::span::Current::none()
    }

    fn on_register_dispatch(&self, dispatch: &tracing::Dispatch) {
        self.0.on_register_dispatch(dispatch)
    }
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        self.0.register_callsite(meta)
    }
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.0.enabled(meta)
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.0.max_level_hint()
    }
    fn new_span(&self, attrs: &span::Attributes<'_>) -> span::Id {
        self.0.new_span(attrs)
    }
    fn record(&self, id: &span::Id, values: &span::Record<'_>) {
        self.0.record(id, values)
    }
    fn record_follows_from(&self, id: &span::Id, follows: &span::Id) {
        self.0.record_follows_from(id, follows)
    }
    fn event_enabled(&self, event: &Event<'_>) -> bool {
        self.0.event_enabled(event)
    }
    fn event(&self, event: &Event<'_>) {
        self.0.event(event)
    }
    fn enter(&self, id: &span::Id) {
        self.0.enter(id)
    }
    fn exit(&self, id: &span::Id) {
        self.0.exit(id)
    }
    fn clone_span(&self, id: &span::Id) -> span::Id {
        self.0.clone_span(id)
    }
    fn try_close(&self, id: span::Id) -> bool {
        self.0.try_close(id)
    }
    unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
        if id == TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: the inner subscriber's own answer, for the inner subscriber,
        // which lives as long as `self`.
        unsafe { self.0.downcast_raw(id) }
    }
}

/// Install the global subscriber. Returns a warning to log once logging is up
/// (e.g. journald was asked for but is not there).
pub fn init(config: &LogConfig) -> Result<Option<String>, LogError> {
    let filter = match std::env::var("NOTESD_LOG").ok().filter(|s| !s.is_empty()) {
        Some(directive) => {
            EnvFilter::try_new(&directive).map_err(|_| LogError::Level(directive))?
        }
        None => {
            EnvFilter::try_new(&config.level).map_err(|_| LogError::Level(config.level.clone()))?
        }
    };
    let json = config.format == "json";
    let mut warning = None;
    let layer: BoxLayer = if let Some(path) = &config.file {
        let file = open_append(path)?;
        let _ = LOG_FILE.set(LogFile {
            path: path.clone(),
            file: Mutex::new(file),
        });
        fmt_layer(json, FileWriter, false)
    } else {
        let want_journal = match config.target.as_str() {
            "journald" => true,
            "auto" => stderr_is_journal(),
            _ => false,
        };
        let journal = if want_journal {
            match journald_layer() {
                Ok(l) => Some(l),
                Err(e) => {
                    warning = Some(format!(
                        "journald is not available ({e}); logging to stderr"
                    ));
                    None
                }
            }
        } else {
            None
        };
        journal.unwrap_or_else(|| fmt_layer(json, io::stderr, false))
    };
    NoCurrentSpan(tracing_subscriber::registry().with(filter).with(layer))
        .try_init()
        .map_err(|_| LogError::AlreadySet)?;
    Ok(warning)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Lines written by a test subscriber.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn no_current_span_for_libraries_but_lines_keep_the_role_span() {
        let lines = Lines::default();
        let writer = lines.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone());
        let subscriber = NoCurrentSpan(tracing_subscriber::registry().with(layer));
        tracing::subscriber::with_default(subscriber, || {
            let role = tracing::info_span!("worker", pid = 7);
            let _entered = role.enter();
            assert!(tracing::Span::current().is_none());
            tracing::info!("hello");
            tracing::info_span!("inner").in_scope(|| tracing::info!("nested"));
        });
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
        assert!(text.contains("worker{pid=7}: "), "{text}");
        assert!(text.contains("hello"), "{text}");
        assert!(text.contains("worker{pid=7}:inner: "), "{text}");
    }

    #[test]
    fn throttle_logs_the_first_of_each_second_with_the_count_skipped() {
        let t = Throttle::new();
        let at = |ms: u64| Duration::from_millis(ms);
        assert_eq!(t.admit(at(0)), Some(0), "the very first is logged");
        assert_eq!(t.admit(at(10)), None);
        assert_eq!(t.admit(at(999)), None);
        assert_eq!(t.admit(at(1000)), Some(2), "next second: logged, 2 skipped");
        assert_eq!(t.admit(at(5000)), Some(0));
        assert_eq!(skipped_note(0), "");
        assert!(skipped_note(2).contains("2 more"));
    }
}
