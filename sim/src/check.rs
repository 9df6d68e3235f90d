//! Ground-truth checks: properties of the simulated world that must hold whatever the dispatcher
//! believes. They pair with the core's own `check_invariants()`, which the world runs too.
//!
//! - A container never has live crunch-run processes on two instances at once.
//! - No container payload starts twice (Running is reached at most once).
//! - By the end every container has ended exactly once (Complete, or Cancelled with a reason).
//! - No instance leaks: every instance the cloud still bills at the end is known to the
//!   dispatcher, and is busy, on hold, or within its idle timeout.
//! - The cloud never holds more than MaxInstances instances the dispatcher created.

use std::collections::BTreeMap;

use arvados_dispatch_cloud::config::Loaded;
use arvados_dispatch_cloud::core::Dispatcher;
use arvados_dispatch_cloud::core::key::Key;
use arvados_dispatch_cloud::core::types::{IdleBehavior, WorkerState};

use crate::api::Controller;
use crate::cloud::Cloud;

/// Most violations kept verbatim (the count is exact).
const VIOLATIONS_KEPT: usize = 100;

/// The checker's state and findings.
#[derive(Clone, Debug, Default)]
pub struct Checker {
    /// Where each container's crunch-run lives (UUIDs and instance IDs kept in place).
    live: BTreeMap<Key, Key>,
    payload_starts: BTreeMap<Key, u32>,
    /// Violations (first ones verbatim).
    pub violations: Vec<String>,
    /// Total violations.
    pub violation_count: usize,
    /// Containers submitted.
    pub submitted: usize,
    /// Containers whose payload started twice.
    pub double_starts: usize,
    /// Instances billed at the end and unknown, or idle past their timeout.
    pub leaked: Vec<String>,
    /// Containers that had not ended at the end.
    pub unfinished: Vec<String>,
}

impl Checker {
    /// Records a violation.
    pub fn violation(&mut self, now: u64, what: String) {
        self.violation_count += 1;
        if self.violations.len() < VIOLATIONS_KEPT {
            self.violations
                .push(format!("t={:.3}s: {what}", now as f64 / 1000.0));
        }
    }

    /// A crunch-run process started; returns the instance where the container already runs.
    pub fn proc_started(&mut self, uuid: &Key, inst: &Key) -> Option<Key> {
        self.live
            .insert(uuid.clone(), inst.clone())
            .filter(|other| other != inst)
    }

    /// A crunch-run process ended.
    pub fn proc_stopped(&mut self, uuid: &Key) {
        self.live.remove(uuid);
    }

    /// A container reached Running.
    pub fn payload_started(&mut self, now: u64, uuid: &Key) {
        let n = {
            let n = self.payload_starts.entry(uuid.clone()).or_default();
            *n += 1;
            *n
        };
        if n > 1 {
            self.double_starts += 1;
            self.violation(
                now,
                format!("container {uuid} started its payload {n} times"),
            );
        }
    }

    /// End-of-run checks.
    pub fn finish(
        &mut self,
        now: u64,
        api: &Controller,
        cloud: &Cloud,
        d: &Dispatcher,
        loaded: &Loaded,
    ) {
        self.unfinished = api
            .rows
            .values()
            .filter(|r| !r.c.state.is_final())
            .map(|r| r.c.uuid.to_string())
            .collect();
        let idle = loaded.core.cloud_vms.timeout_idle
            + loaded.core.cloud_vms.probe_interval * 2
            + loaded.core.cloud_vms.sync_interval
            + loaded.core.cloud_vms.timeout_shutdown * 2;
        let idle_ms = idle.as_millis() as u64;
        let workers = d.pool().workers();
        for (id, inst) in &cloud.instances {
            let ok = match workers.get(id.as_str()) {
                None => {
                    now.saturating_sub(inst.created_at)
                        < loaded.core.cloud_vms.sync_interval.as_millis() as u64 * 2
                }
                Some(w) => {
                    w.runner_count() > 0
                        || w.idle_behavior == IdleBehavior::Hold
                        || (w.state != WorkerState::Shutdown
                            && now.saturating_sub(w.busy.0) < idle_ms)
                        || (w.state == WorkerState::Shutdown
                            && now.saturating_sub(w.destroyed.map_or(0, |t| t.0)) < idle_ms)
                        || now.saturating_sub(inst.created_at) < idle_ms
                }
            };
            if !ok {
                self.leaked.push(id.to_string());
            }
        }
    }
}
