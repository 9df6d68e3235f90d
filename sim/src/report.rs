//! The run summary, as text and as JSON (schema in docs/simulation.md), and the evaluation of the
//! scenario's `expect:` block.

use std::collections::BTreeMap;

use arvados_dispatch_cloud::core::metrics::BootOutcome;
use arvados_dispatch_cloud::core::types::ContainerState;
use serde::Serialize;

use crate::world::World;

/// Wait-time percentiles, seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Waits {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Longest.
    pub max: f64,
    /// Containers that started.
    pub started: usize,
}

/// Container totals.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Containers {
    /// Submitted.
    pub total: usize,
    /// Complete.
    pub completed: usize,
    /// Cancelled.
    pub cancelled: usize,
    /// Not ended when the run stopped.
    pub unfinished: usize,
    /// Cancellations by reason.
    pub cancel_reasons: BTreeMap<String, usize>,
}

/// Instance totals.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Instances {
    /// Created.
    pub created: usize,
    /// Leaked at the end.
    pub leaked: usize,
    /// Most alive at once.
    pub peak: usize,
    /// Reclaimed (spot).
    pub reclaimed: usize,
    /// Instance-hours by type.
    pub hours_by_type: BTreeMap<String, f64>,
}

/// One expectation and whether it held.
#[derive(Clone, Debug, Serialize)]
pub struct Expectation {
    /// What.
    pub name: String,
    /// Held.
    pub ok: bool,
    /// The value seen.
    pub detail: String,
}

/// The run summary.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Root seed.
    pub seed: u64,
    /// FNV-1a 64 of the event log, hex.
    pub event_log_hash: String,
    /// Dollars.
    pub cost_usd: f64,
    /// Containers.
    pub containers: Containers,
    /// Wait from submission to Running.
    pub wait_seconds: Waits,
    /// Instances.
    pub instances: Instances,
    /// Container vCPU-seconds / paid vCPU-seconds.
    pub utilisation: f64,
    /// Boot outcomes.
    pub boot_outcomes: BTreeMap<String, u64>,
    /// Invariant violations (core and ground truth).
    pub invariant_violations: usize,
    /// The first violations.
    pub violations: Vec<String>,
    /// Events processed.
    pub events: u64,
    /// Event-log lines.
    pub log_lines: u64,
    /// Scheduling passes.
    pub scheduling_passes: u64,
    /// Dispatcher restarts.
    pub restarts: usize,
    /// Simulated seconds.
    pub sim_seconds: f64,
    /// Wall-clock seconds.
    pub wall_seconds: f64,
    /// Simulated events per wall second.
    pub events_per_second: f64,
    /// The `expect:` block, evaluated.
    pub expectations: Vec<Expectation>,
    /// Everything held.
    pub passed: bool,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// Builds the report after `World::run`.
pub fn build(w: &World, wall_seconds: f64) -> Report {
    let now = w.now;
    let mut c = Containers {
        total: w.api.rows.len(),
        ..Containers::default()
    };
    let mut waits = Vec::new();
    let mut container_vcpu_seconds = 0.0;
    for r in w.api.rows.values() {
        match r.c.state {
            ContainerState::Complete => c.completed += 1,
            ContainerState::Cancelled => {
                c.cancelled += 1;
                *c.cancel_reasons
                    .entry(r.cancel_reason.clone().unwrap_or_default())
                    .or_default() += 1;
            }
            _ => c.unfinished += 1,
        }
        if let Some(t) = r.running_at {
            waits.push(t.saturating_sub(r.c.created_at.0) as f64 / 1000.0);
            let end = r.ended_at.unwrap_or(now);
            container_vcpu_seconds +=
                r.c.runtime_constraints.vcpus.max(1) as f64 * end.saturating_sub(t) as f64 / 1000.0;
        }
    }
    waits.sort_by(f64::total_cmp);
    let billing = w.cloud.cost_at(now);
    let m = &w.totals.pool;
    let boot_outcomes = BootOutcome::ALL
        .iter()
        .map(|o| (o.as_str().to_string(), m.boot_outcomes[*o as usize]))
        .collect();
    let mut r = Report {
        scenario: w.scenario.name.clone(),
        seed: w.seed,
        event_log_hash: w.log.hash_hex(),
        cost_usd: billing.cost_usd,
        containers: c,
        wait_seconds: Waits {
            p50: percentile(&waits, 0.5),
            p95: percentile(&waits, 0.95),
            max: waits.last().copied().unwrap_or(0.0),
            started: waits.len(),
        },
        instances: Instances {
            created: w.cloud.created,
            leaked: w.checker.leaked.len(),
            peak: w.cloud.peak,
            reclaimed: w.cloud.reclaims,
            hours_by_type: billing
                .seconds_by_type
                .iter()
                .map(|(k, v)| (k.clone(), v / 3600.0))
                .collect(),
        },
        utilisation: if billing.vcpu_seconds > 0.0 {
            container_vcpu_seconds / billing.vcpu_seconds
        } else {
            0.0
        },
        boot_outcomes,
        invariant_violations: w.checker.violation_count,
        violations: w.checker.violations.clone(),
        events: w.totals.events,
        log_lines: w.log.lines(),
        scheduling_passes: w.totals.passes,
        restarts: w.totals.restarts,
        sim_seconds: now as f64 / 1000.0,
        wall_seconds,
        events_per_second: if wall_seconds > 0.0 {
            w.totals.events as f64 / wall_seconds
        } else {
            0.0
        },
        expectations: Vec::new(),
        passed: false,
    };
    r.expectations = evaluate(w, &r);
    r.passed = r.invariant_violations == 0 && r.expectations.iter().all(|e| e.ok);
    r
}

fn evaluate(w: &World, r: &Report) -> Vec<Expectation> {
    let e = &w.scenario.expect;
    let mut out = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| {
        out.push(Expectation {
            name: name.to_string(),
            ok,
            detail,
        });
    };
    check(
        "no invariant violations",
        r.invariant_violations == 0,
        format!("{}", r.invariant_violations),
    );
    if e.all_ended {
        check(
            "all containers ended",
            r.containers.unfinished == 0,
            format!(
                "{} unfinished: {:?}",
                r.containers.unfinished,
                w.checker.unfinished.iter().take(5).collect::<Vec<_>>()
            ),
        );
    }
    if let Some(n) = e.completed_min {
        check(
            "completed_min",
            r.containers.completed >= n,
            format!("{} completed, want >= {n}", r.containers.completed),
        );
    }
    if let Some(n) = e.cancelled_max {
        check(
            "cancelled_max",
            r.containers.cancelled <= n,
            format!("{} cancelled, want <= {n}", r.containers.cancelled),
        );
    }
    check(
        "leaked_max",
        r.instances.leaked <= e.leaked_max,
        format!(
            "{} leaked {:?}, want <= {}",
            r.instances.leaked, w.checker.leaked, e.leaked_max
        ),
    );
    if let Some(c) = e.cost_max_usd {
        check(
            "cost_max_usd",
            r.cost_usd <= c,
            format!("${:.2}, want <= ${c:.2}", r.cost_usd),
        );
    }
    if let Some(d) = e.wait_p95_max {
        let max = d.0.as_secs_f64();
        check(
            "wait_p95_max",
            r.wait_seconds.p95 <= max,
            format!("{:.1}s, want <= {max:.1}s", r.wait_seconds.p95),
        );
    }
    if let Some(n) = e.instances_created_min {
        check(
            "instances_created_min",
            r.instances.created >= n,
            format!("{} created, want >= {n}", r.instances.created),
        );
    }
    if e.no_double_start {
        check(
            "no double start",
            w.checker.double_starts == 0,
            format!("{}", w.checker.double_starts),
        );
    }
    for o in &e.boot_outcomes {
        let n = r.boot_outcomes.get(o).copied();
        check(
            &format!("boot outcome {o}"),
            n.is_some_and(|n| n > 0),
            format!("{n:?}"),
        );
    }
    for g in &e.nonzero {
        let (ok, detail) = match g.as_str() {
            "last_503_time" => (w.totals.saw_503, format!("{}", w.totals.saw_503)),
            "max_concurrent_containers" => (
                w.totals.max_concurrent_seen > 0,
                format!("{}", w.totals.max_concurrent_seen),
            ),
            "containers_not_allocated_over_quota" => (
                w.totals.saw_over_quota,
                format!("{}", w.totals.saw_over_quota),
            ),
            other => (false, format!("unknown gauge {other:?}")),
        };
        check(&format!("{g} was non-zero"), ok, detail);
    }
    out
}

/// The human summary.
pub fn text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "scenario {} seed {}: {}",
        r.scenario,
        r.seed,
        if r.passed { "PASSED" } else { "FAILED" }
    );
    let c = &r.containers;
    let _ = writeln!(
        s,
        "containers: {} total, {} completed, {} cancelled, {} unfinished",
        c.total, c.completed, c.cancelled, c.unfinished
    );
    for (reason, n) in &c.cancel_reasons {
        let _ = writeln!(s, "  cancelled {n}: {reason}");
    }
    let _ = writeln!(
        s,
        "cost: ${:.2}   utilisation: {:.1}%",
        r.cost_usd,
        r.utilisation * 100.0
    );
    let _ = writeln!(
        s,
        "instances: {} created, peak {}, {} reclaimed, {} leaked",
        r.instances.created, r.instances.peak, r.instances.reclaimed, r.instances.leaked
    );
    for (t, h) in &r.instances.hours_by_type {
        let _ = writeln!(s, "  {t}: {h:.2} instance-hours");
    }
    let w = &r.wait_seconds;
    let _ = writeln!(
        s,
        "wait to start: p50 {:.1}s  p95 {:.1}s  max {:.1}s  ({} started)",
        w.p50, w.p95, w.max, w.started
    );
    let outcomes: Vec<String> = r
        .boot_outcomes
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(s, "boot outcomes: {}", outcomes.join(", "));
    let _ = writeln!(s, "invariant violations: {}", r.invariant_violations);
    for v in r.violations.iter().take(10) {
        let _ = writeln!(s, "  {v}");
    }
    for e in r.expectations.iter().filter(|e| !e.ok) {
        let _ = writeln!(s, "expectation failed: {}: {}", e.name, e.detail);
    }
    let _ = writeln!(
        s,
        "events: {} ({} log lines, {} scheduling passes, {} restarts)   simulated {:.0}s in {:.2}s wall ({:.0} events/s)",
        r.events,
        r.log_lines,
        r.scheduling_passes,
        r.restarts,
        r.sim_seconds,
        r.wall_seconds,
        r.events_per_second
    );
    let _ = writeln!(s, "event log hash: {}", r.event_log_hash);
    s
}
