//! Status helpers: reading the JSON of `notesd status --json`.

use serde_json::Value;

/// The `workers` array of a status (empty when absent).
pub fn workers(status: &Value) -> Vec<Value> {
    status["workers"].as_array().cloned().unwrap_or_default()
}

pub fn worker_pid(w: &Value) -> i32 {
    w["pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or(-1)
}

/// Sorted pids of the workers in state ready.
pub fn ready_pids(status: &Value) -> Vec<i32> {
    let mut pids: Vec<i32> = workers(status)
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(worker_pid)
        .collect();
    pids.sort_unstable();
    pids
}

/// Sorted pids of all workers, whatever their state.
pub fn all_pids(status: &Value) -> Vec<i32> {
    let mut pids: Vec<i32> = workers(status).iter().map(worker_pid).collect();
    pids.sort_unstable();
    pids
}

pub fn generation(status: &Value) -> u64 {
    status["generation"].as_u64().unwrap_or(0)
}

/// Phase running, target_workers == n, exactly n workers, all ready.
pub fn is_steady(status: &Value, n: usize) -> bool {
    let ws = workers(status);
    status["phase"] == "running"
        && status["target_workers"].as_u64() == Some(n as u64)
        && ws.len() == n
        && ws.iter().all(|w| w["state"] == "ready")
}

/// All workers of `status` belong to its current generation.
pub fn all_of_current_generation(status: &Value) -> bool {
    let g = generation(status);
    workers(status)
        .iter()
        .all(|w| w["generation"].as_u64() == Some(g))
}
