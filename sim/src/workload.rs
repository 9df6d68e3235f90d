//! Workloads: the containers a scenario submits, from explicit lists, generators and CSV traces.
//!
//! Everything is expanded up front into a list of arrivals sorted by (time, sequence), drawn
//! from the `workload` stream, so the same seed gives the same containers whatever else the
//! simulation does. Workflow children are drawn later, when their supervisor runs, from the
//! same stream's per-workflow sub-stream.

use std::path::Path;
use std::time::Duration;

use arvados_dispatch_cloud::core::rng::Rng;
use arvados_dispatch_cloud::core::time::millis;
use arvados_dispatch_cloud::core::types::Container;

use crate::dist::exponential;
use crate::scenario::{Arrival as ArrivalSpec, Shape, WorkflowSpec, WorkloadSpec};

const GIB: f64 = (1u64 << 30) as f64;

/// One container the workload submits.
#[derive(Clone, Debug)]
pub struct Submission {
    /// Arrival time, ms.
    pub at: u64,
    /// The container (uuid, constraints, priority, scheduling parameters).
    pub container: Container,
    /// Payload run time.
    pub runtime: Duration,
    /// The user cancels it this long after arrival.
    pub cancel_after: Option<Duration>,
    /// It is a workflow supervisor with these children.
    pub workflow: Option<WorkflowSpec>,
}

/// Why a workload could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WorkloadError(pub String);

/// A container of this shape.
pub fn from_shape(shape: &Shape, rng: &mut Rng) -> (Container, Duration) {
    let mut c = Container::default();
    let rc = &mut c.runtime_constraints;
    rc.vcpus = shape.vcpus.sample(rng).round().max(0.0) as i64;
    rc.ram = (shape.ram_gib.sample(rng) * GIB) as i64;
    rc.keep_cache_disk = (shape.scratch_gib.sample(rng) * GIB) as i64;
    let gpus = shape.gpus.sample(rng).round() as i64;
    if gpus > 0 {
        rc.gpu.stack = "cuda".into();
        rc.gpu.device_count = gpus;
        rc.gpu.driver_version = "11.0".into();
        rc.gpu.hardware_target = vec!["8.0".into()];
    }
    c.scheduling_parameters.preemptible = rng.unit_f64() < shape.preemptible;
    c.priority = shape.priority.sample(rng).round().max(1.0) as i64;
    let runtime = shape.runtime.draw(rng);
    (c, runtime)
}

/// Expands a workload. `dir` resolves a relative trace path (read once, before the run).
#[allow(clippy::disallowed_methods)]
pub fn expand(
    spec: &WorkloadSpec,
    dir: &Path,
    rng: &mut Rng,
) -> Result<Vec<Submission>, WorkloadError> {
    let mut subs: Vec<Submission> = Vec::new();
    for e in &spec.containers {
        for _ in 0..e.count {
            let mut c = Container::default();
            c.runtime_constraints.vcpus = e.vcpus;
            c.runtime_constraints.ram = e.ram.0;
            c.runtime_constraints.keep_cache_disk = e.scratch.0;
            if e.gpus > 0 {
                c.runtime_constraints.gpu.stack = "cuda".into();
                c.runtime_constraints.gpu.device_count = e.gpus;
                c.runtime_constraints.gpu.driver_version = "11.0".into();
                c.runtime_constraints.gpu.hardware_target = vec!["8.0".into()];
            }
            c.priority = e.priority;
            c.scheduling_parameters.preemptible = e.preemptible;
            c.scheduling_parameters.supervisor = e.supervisor;
            subs.push(Submission {
                at: millis(e.at.0),
                container: c,
                runtime: e.runtime.0,
                cancel_after: e.cancel_after.map(|d| d.0),
                workflow: None,
            });
        }
    }
    for g in &spec.generators {
        let mut t = millis(g.start.0) as f64;
        for i in 0..g.count {
            let at = match &g.arrival {
                ArrivalSpec::Batch => millis(g.start.0) as f64,
                ArrivalSpec::Poisson { per_hour } => {
                    if i > 0 {
                        t += exponential(rng, 3_600_000.0 / per_hour);
                    }
                    t
                }
                ArrivalSpec::Bursts { size, every } => {
                    millis(g.start.0) as f64 + (i / (*size).max(1)) as f64 * millis(every.0) as f64
                }
            };
            let (mut c, runtime) = from_shape(&g.shape, rng);
            c.scheduling_parameters.supervisor = g.workflow.is_some();
            let cancel_after = (rng.unit_f64() < g.cancel_rate).then(|| g.cancel_after.draw(rng));
            subs.push(Submission {
                at: at as u64,
                container: c,
                runtime,
                cancel_after,
                workflow: g.workflow.clone(),
            });
        }
    }
    if let Some(trace) = &spec.trace {
        let path = dir.join(trace);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            WorkloadError(format!(
                "workload.trace: cannot read {}: {e}",
                path.display()
            ))
        })?;
        subs.extend(parse_trace(&text, &path.display().to_string())?);
    }
    // Stable: equal times keep their listing order.
    subs.sort_by_key(|s| s.at);
    Ok(subs)
}

/// The CSV trace columns (docs/simulation.md).
pub const TRACE_HEADER: &str =
    "submit_seconds,vcpus,ram_gib,scratch_gib,gpus,runtime_seconds,priority,preemptible,supervisor";

/// Parses a CSV trace.
pub fn parse_trace(text: &str, origin: &str) -> Result<Vec<Submission>, WorkloadError> {
    let mut out = Vec::new();
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
    match lines.next() {
        Some((_, h)) if h.trim() == TRACE_HEADER => {}
        Some((n, h)) => {
            return Err(WorkloadError(format!(
                "{origin}:{}: header must be {TRACE_HEADER:?}, got {h:?}",
                n + 1
            )));
        }
        None => return Err(WorkloadError(format!("{origin}: empty trace"))),
    }
    for (n, line) in lines {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let cols: Vec<&str> = TRACE_HEADER.split(',').collect();
        if f.len() != cols.len() {
            return Err(WorkloadError(format!(
                "{origin}:{}: expected {} fields, got {}",
                n + 1,
                cols.len(),
                f.len()
            )));
        }
        let num = |i: usize| -> Result<f64, WorkloadError> {
            f[i].parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    WorkloadError(format!(
                        "{origin}:{}: {}: invalid number {:?}",
                        n + 1,
                        cols[i],
                        f[i]
                    ))
                })
        };
        let flag = |i: usize| -> Result<bool, WorkloadError> {
            match f[i] {
                "true" | "1" => Ok(true),
                "false" | "0" | "" => Ok(false),
                v => Err(WorkloadError(format!(
                    "{origin}:{}: {}: invalid boolean {v:?}",
                    n + 1,
                    cols[i]
                ))),
            }
        };
        let mut c = Container::default();
        c.runtime_constraints.vcpus = num(1)? as i64;
        c.runtime_constraints.ram = (num(2)? * GIB) as i64;
        c.runtime_constraints.keep_cache_disk = (num(3)? * GIB) as i64;
        let gpus = num(4)? as i64;
        if gpus > 0 {
            c.runtime_constraints.gpu.stack = "cuda".into();
            c.runtime_constraints.gpu.device_count = gpus;
            c.runtime_constraints.gpu.driver_version = "11.0".into();
            c.runtime_constraints.gpu.hardware_target = vec!["8.0".into()];
        }
        c.priority = (num(6)? as i64).max(1);
        c.scheduling_parameters.preemptible = flag(7)?;
        c.scheduling_parameters.supervisor = flag(8)?;
        out.push(Submission {
            at: (num(0)? * 1000.0) as u64,
            container: c,
            runtime: Duration::from_secs_f64(num(5)?),
            cancel_after: None,
            workflow: None,
        });
    }
    Ok(out)
}
