//! # dispatch-sim
//!
//! A deterministic discrete-event simulator that drives the very same core
//! (`arvados_dispatch_cloud::core::Dispatcher`) that production runs, against a simulated
//! controller (`api`), cloud and VMs with crunch-run (`cloud`), fed by workloads (`workload`)
//! described in scenario files (`scenario`). `world` owns virtual time and the event heap;
//! `check` holds the ground-truth checks; `log` the canonical event log and its hash; `report`
//! the summary; `sweep` runs a scenario under many dispatcher policies and seeds in parallel and
//! `report_html` renders its report; `whatif` forks a dispatcher's snapshot (from the
//! management API or a simulated run) into two worlds, with and without config changes. A world
//! has no threads, no sleeping and no wall clock: a simulated week takes seconds, and the same
//! seed gives the same event log byte for byte.

#![warn(missing_docs)]

#[cfg(feature = "shell")]
pub mod adapters;
pub mod api;
pub mod check;
pub mod cloud;
pub mod controller;
pub mod dist;
pub mod log;
pub mod report;
pub mod report_html;
pub mod scenario;
pub mod sweep;
pub mod whatif;
pub mod workload;
pub mod world;

use std::io::Write;
use std::path::Path;

/// Loads a scenario, runs it with `seed` (or its own), and builds the report. `wall` measures
/// elapsed wall time for the report (the world itself never reads a clock).
pub fn run_file(
    path: &Path,
    seed: Option<u64>,
    log_out: Option<Box<dyn Write>>,
    wall: impl Fn() -> f64,
    progress: impl FnMut(u64, u64),
) -> Result<report::Report, String> {
    let scenario = scenario::Scenario::load(path).map_err(|e| e.to_string())?;
    let seed = seed.unwrap_or(scenario.seed);
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut w = world::World::new(scenario, dir, seed, log_out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    w.run(progress);
    w.log
        .flush()
        .map_err(|e| format!("writing the event log: {e}"))?;
    Ok(report::build(&w, wall()))
}
