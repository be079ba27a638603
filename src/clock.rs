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

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the same clock, read from the
/// last tick (1–4 ms old) without touching the hardware counter — a few ns
/// instead of ~20. For the per-request phase stamps, which matter in seconds.
pub(crate) fn coarse_now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => now_ns(),
    }
}
