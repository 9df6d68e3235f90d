//! Counters and summaries the core keeps for `/metrics` and for simulation reports.
//!
//! Summaries mimic Prometheus client_golang's: count and sum over all time, quantiles over a
//! sliding window (10 minutes). The window is bounded in length, so memory stays constant.

use std::collections::VecDeque;
use std::time::Duration;

use super::time::Timestamp;

/// The quantiles Arvados exports: {0.5, 0.9, 0.95, 0.99}.
pub const QUANTILES: [f64; 4] = [0.5, 0.9, 0.95, 0.99];

const WINDOW: Duration = Duration::from_secs(600);
const WINDOW_LEN_MAX: usize = 4096;

/// A summary metric.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// Observations ever made.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    window: VecDeque<(Timestamp, f64)>,
}

impl Summary {
    /// Records one observation made at `now`.
    pub fn observe(&mut self, now: Timestamp, v: f64) {
        self.count += 1;
        self.sum += v;
        if self.window.len() == WINDOW_LEN_MAX {
            self.window.pop_front();
        }
        self.window.push_back((now, v));
    }

    /// The `q` quantile over the last 10 minutes before `now` (NaN when empty, as Go reports).
    pub fn quantile(&self, now: Timestamp, q: f64) -> f64 {
        let cutoff = now - WINDOW;
        let mut vals: Vec<f64> = self
            .window
            .iter()
            .filter(|(t, _)| *t >= cutoff)
            .map(|(_, v)| *v)
            .collect();
        if vals.is_empty() {
            return f64::NAN;
        }
        vals.sort_by(f64::total_cmp);
        let idx = ((q * vals.len() as f64).ceil() as usize).clamp(1, vals.len()) - 1;
        vals[idx]
    }
}

/// Boot outcomes (reference-workers.md §1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BootOutcome {
    /// Probes succeeded.
    Success,
    /// Boot failed or the worker reported itself broken.
    Failure,
    /// Shut down before it was useful (idle, drain, scheduler, admin).
    Aborted,
    /// Vanished from the cloud listing.
    Disappeared,
}

impl BootOutcome {
    /// All outcomes, for pre-created series.
    pub const ALL: [BootOutcome; 4] = [
        BootOutcome::Success,
        BootOutcome::Failure,
        BootOutcome::Aborted,
        BootOutcome::Disappeared,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BootOutcome::Success => "success",
            BootOutcome::Failure => "failure",
            BootOutcome::Aborted => "aborted",
            BootOutcome::Disappeared => "disappeared",
        }
    }
}

/// Driver operation names for `driver_operations{operation}`.
pub const DRIVER_OPERATIONS: [&str; 4] = ["Create", "List", "Destroy", "SetTags"];

/// Everything the pool counts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolMetrics {
    /// `boot_outcomes{outcome}`, indexed like [`BootOutcome::ALL`].
    pub boot_outcomes: [u64; 4],
    /// `instances_disappeared{state}`, indexed like `WorkerState::ALL`.
    pub instances_disappeared: [u64; 5],
    /// `driver_operations{operation, error}`: [operation][error as usize].
    pub driver_operations: [[u64; 2]; 4],
    /// `instances_time_to_ssh_seconds`.
    pub time_to_ssh: Summary,
    /// `instances_time_to_ready_for_container_seconds`.
    pub time_to_ready: Summary,
    /// `instances_time_from_shutdown_request_to_disappearance_seconds`.
    pub shutdown_to_disappearance: Summary,
    /// `containers_time_from_queue_to_crunch_run_seconds`.
    pub queue_to_crunch_run: Summary,
    /// `instances_run_probe_duration_seconds{outcome="success"}`.
    pub run_probe_success: Summary,
    /// `instances_run_probe_duration_seconds{outcome="fail"}`.
    pub run_probe_fail: Summary,
}

impl PoolMetrics {
    /// Counts one boot outcome.
    pub fn boot(&mut self, o: BootOutcome) {
        self.boot_outcomes[o as usize] += 1;
    }

    /// Counts one driver call.
    pub fn driver_op(&mut self, operation: &str, failed: bool) {
        if let Some(i) = DRIVER_OPERATIONS.iter().position(|o| *o == operation) {
            self.driver_operations[i][usize::from(failed)] += 1;
        }
    }
}
