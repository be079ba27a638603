//! Monotonic time shared by master and workers.
//!
//! Heartbeats cross process boundaries through the scoreboard, so both sides
//! must read the same clock: `CLOCK_MONOTONIC`, as nanoseconds.

use std::time::Duration;

/// Current `CLOCK_MONOTONIC` reading as a `Duration` since an arbitrary origin
/// (boot), identical in every process on the host.
pub(crate) fn now() -> Duration {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32),
        // CLOCK_MONOTONIC cannot fail on Linux; fall back to zero rather than panic.
        Err(_) => Duration::ZERO,
    }
}

/// `now()` in nanoseconds, the unit stored in the scoreboard.
pub(crate) fn now_ns() -> u64 {
    now().as_nanos() as u64
}
