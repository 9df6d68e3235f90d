//! Pricing-policy sweeps: one base scenario run under many dispatcher policies × seeds.
//!
//! A sweep file names a base scenario, a grid (or a random sample of it) over policy knobs, the
//! default policy to compare against, spot market prices and an objective. Each knob is applied
//! by editing the scenario's cluster config (the same keys as the Arvados config) before the
//! world is built, so every run goes through the dispatcher's own config loader. The runs are
//! independent pure functions of (policy, seed) and run in parallel on a rayon pool; results are
//! collected in job order, sorted by (policy, seed), so every output is byte-identical whatever
//! the thread count. No output contains wall-clock times.
//!
//! Billing: the simulated cloud bills a preemptible variant at its configured price (on-demand ×
//! `PreemptiblePriceFactor`, which is the bid). Real spot instances bill at the market price, and
//! a launch whose bid is under the market price fails. The sweep models both from the sweep
//! file's `spot_prices`: a variant whose bid is under its market price gets a permanent capacity
//! error, and `cost_usd` re-prices each type's instance-hours at the market price
//! (`cost_at_bid_usd` keeps the simulator's figure).
//!
//! `AlwaysUsePreemptibleInstances` is a controller setting (Rails marks child containers
//! preemptible when preemptible types exist); the simulated controller does not read it, so the
//! sweep applies it to the workload: workflow children become preemptible.
//!
//! Instance counts over time come from the canonical event log, parsed as it is written (create
//! results, successful destroys and spot reclaims); instances created by a dispatcher generation
//! that a restart retired are not seen, so series of scenarios with restarts are approximate.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arvados_dispatch_cloud::core::rng::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use crate::dist::Dur;
use crate::scenario::{CapacitySpec, Scenario};

/// The user-cancellation reason the simulated controller records.
const USER_CANCEL: &str = "cancelled by user";

/// Containers a spot reclaim may leave cancelled or unfinished without making a policy
/// infeasible: the container that was running (Arvados would retry its container request,
/// which the simulator does not model) and its workflow supervisor (which the simulator leaves
/// waiting for the cancelled child).
const SPOT_LOSSES_PER_RECLAIM: usize = 2;

/// Knobs under `Containers`.
const CONTAINERS_KNOBS: &[&str] = &[
    "MaximumPriceFactor",
    "PreemptiblePriceFactor",
    "AlwaysUsePreemptibleInstances",
    "ReserveExtraRAM",
];

/// Knobs under `Containers.CloudVMs`.
const CLOUDVMS_KNOBS: &[&str] = &[
    "TimeoutIdle",
    "TimeoutBooting",
    "MaxRunningContainersPerInstance",
    "MaxInstances",
    "SupervisorFraction",
    "MaxConcurrentInstanceCreateOps",
    "PollInterval",
];

/// Why a sweep could not be loaded, run or written.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The sweep file is not valid.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A knob value could not be applied.
    #[error("knob {knob} = {value}: {message}")]
    Knob {
        /// The knob.
        knob: String,
        /// Its value, as written.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// A run could not start.
    #[error("policy {policy} seed {seed}: {message}")]
    Run {
        /// The policy label.
        policy: String,
        /// The seed.
        seed: u64,
        /// What went wrong.
        message: String,
    },
    /// An output could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Seeds: a list, or a count `n` meaning 1..=n.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Seeds {
    /// 1..=n.
    Count(u64),
    /// These.
    List(Vec<u64>),
}

impl Seeds {
    /// The seeds, in the order given.
    pub fn list(&self) -> Vec<u64> {
        match self {
            Seeds::Count(n) => (1..=*n).collect(),
            Seeds::List(v) => v.clone(),
        }
    }
}

/// A random sample of the grid instead of all of it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// How many policies (the default policy is always added).
    pub count: usize,
    /// The sampling seed.
    #[serde(default = "one")]
    pub seed: u64,
}

fn one() -> u64 {
    1
}

fn ratio_one() -> f64 {
    1.0
}

/// What the recommendation optimises: the cheapest mean cost subject to a p95 wait bound.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    /// Mean p95 wait at most the default policy's times this (default 1: no worse).
    #[serde(default = "ratio_one")]
    pub max_p95_ratio: f64,
    /// An absolute bound on the mean p95 wait instead of the ratio.
    pub max_p95_wait: Option<Dur>,
}

impl Default for Objective {
    fn default() -> Self {
        Objective {
            max_p95_ratio: 1.0,
            max_p95_wait: None,
        }
    }
}

/// A sweep file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// Short name.
    pub name: String,
    /// What it explores.
    #[serde(default)]
    pub description: String,
    /// The base scenario, relative to the sweep file.
    pub base: String,
    /// Seeds each policy runs with.
    pub seeds: Seeds,
    /// Knob name → the values to try, in order.
    pub grid: Mapping,
    /// Knob name → value of the default policy (knobs left out keep the base config's value).
    #[serde(default)]
    pub default: Mapping,
    /// Named instance-type catalogues for the `InstanceTypes` knob (Arvados `InstanceTypes`).
    #[serde(default)]
    pub catalogues: BTreeMap<String, Value>,
    /// Spot market price per hour by type name or ProviderType.
    #[serde(default)]
    pub spot_prices: BTreeMap<String, f64>,
    /// Run a random sample of the grid.
    pub sample: Option<Sample>,
    /// The recommendation's objective.
    #[serde(default)]
    pub objective: Objective,
}

/// One policy: a value per knob (`null` keeps the base config's value).
#[derive(Clone, Debug)]
pub struct Policy {
    /// Its index in the sweep (0 is the default policy).
    pub index: usize,
    /// `default` or `p<index>`.
    pub label: String,
    /// Knob values, in the grid's knob order.
    pub values: Vec<Value>,
}

/// A policy ready to run: the edited scenario and the billing prices.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The policy.
    pub policy: Policy,
    /// The base scenario with the knobs applied.
    pub scenario: Scenario,
    /// Billed price per hour by type name.
    pub billed_price: BTreeMap<String, f64>,
}

/// A loaded sweep.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// The file.
    pub file: SweepFile,
    /// Knob names, in grid order.
    pub knobs: Vec<String>,
    /// The policies to run (index 0 is the default).
    pub policies: Vec<Prepared>,
    /// The seeds.
    pub seeds: Vec<u64>,
    /// The directory the base scenario lives in (for traces).
    pub base_dir: PathBuf,
    /// The cluster ID of the base config.
    pub cluster_id: String,
}

/// One run's results.
#[derive(Clone, Debug, Serialize)]
pub struct RunRow {
    /// Policy index.
    pub policy: usize,
    /// Policy label.
    pub label: String,
    /// Knob values as text.
    pub knobs: BTreeMap<String, String>,
    /// Seed.
    pub seed: u64,
    /// Dollars at spot market prices.
    pub cost_usd: f64,
    /// Dollars as the simulated cloud billed them (preemptible at the bid).
    pub cost_at_bid_usd: f64,
    /// Median wait to start, seconds.
    pub wait_p50_s: f64,
    /// 95th percentile wait to start, seconds.
    pub wait_p95_s: f64,
    /// Longest wait to start, seconds.
    pub wait_max_s: f64,
    /// Containers submitted.
    pub containers: usize,
    /// Complete.
    pub completed: usize,
    /// Cancelled (for any reason).
    pub cancelled: usize,
    /// Cancelled other than by the user (for example unsatisfiable).
    pub cancelled_not_by_user: usize,
    /// Not ended when the run stopped.
    pub unfinished: usize,
    /// Instance-hours, all types.
    pub instance_hours: f64,
    /// Container vCPU-seconds / paid vCPU-seconds.
    pub utilisation: f64,
    /// Instances created.
    pub instances_created: usize,
    /// Most instances at once.
    pub instances_peak: usize,
    /// Spot reclaims.
    pub reclaims: usize,
    /// Invariant violations.
    pub invariant_violations: usize,
    /// Simulated seconds.
    pub sim_seconds: f64,
    /// Event log hash.
    pub event_log_hash: String,
}

/// Instance counts over time: `(ms, type, +1 | -1)` changes, sorted by time.
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// The changes.
    pub changes: Vec<(u64, String, i32)>,
    /// The end of the run, ms.
    pub end_ms: u64,
}

impl Series {
    /// Counts by type at `points` evenly spaced times from 0 to the end (inclusive): the type
    /// names (sorted) and, per time, the count of each.
    pub fn sampled(&self, points: usize) -> (Vec<String>, Vec<(u64, Vec<i64>)>) {
        let mut names: Vec<String> = self.changes.iter().map(|c| c.1.clone()).collect();
        names.sort();
        names.dedup();
        let index: BTreeMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let points = points.max(2);
        let mut counts = vec![0i64; names.len()];
        let mut out = Vec::with_capacity(points);
        let mut next = 0;
        for p in 0..points {
            let t = (self.end_ms as u128 * p as u128 / (points - 1) as u128) as u64;
            while next < self.changes.len() && self.changes[next].0 <= t {
                let (_, name, d) = &self.changes[next];
                counts[index[name.as_str()]] += i64::from(*d);
                next += 1;
            }
            out.push((t, counts.iter().map(|c| (*c).max(0)).collect()));
        }
        (names, out)
    }
}

/// Per-policy aggregate over seeds.
#[derive(Clone, Debug, Serialize)]
pub struct PolicySummary {
    /// Policy index.
    pub policy: usize,
    /// Policy label.
    pub label: String,
    /// Knob values as text.
    pub knobs: BTreeMap<String, String>,
    /// Mean cost at market prices.
    pub mean_cost_usd: f64,
    /// Mean p50 wait.
    pub mean_wait_p50_s: f64,
    /// Mean p95 wait.
    pub mean_wait_p95_s: f64,
    /// Worst p95 wait over seeds.
    pub worst_wait_p95_s: f64,
    /// Mean instance-hours.
    pub mean_instance_hours: f64,
    /// Mean utilisation.
    pub mean_utilisation: f64,
    /// Whether every run had no invariant violations and lost (left unfinished or had the
    /// dispatcher cancel) no more containers than the default policy with the same seed, apart
    /// from up to two per spot reclaim.
    pub feasible: bool,
    /// Why not, when not.
    pub infeasible_reason: Option<String>,
    /// On the Pareto front of (mean cost, mean p95 wait) among feasible policies.
    pub pareto: bool,
}

/// The saving of the recommended policy and its spread over seeds.
#[derive(Clone, Debug, Serialize)]
pub struct Saving {
    /// Mean over seeds of the per-seed saving, percent.
    pub mean_percent: f64,
    /// Smallest per-seed saving.
    pub min_percent: f64,
    /// Largest per-seed saving.
    pub max_percent: f64,
    /// Standard deviation over seeds.
    pub stddev_percent: f64,
    /// Saving of the mean costs, percent.
    pub of_mean_cost_percent: f64,
    /// Per seed.
    pub per_seed: BTreeMap<u64, f64>,
}

/// The recommendation.
#[derive(Clone, Debug, Serialize)]
pub struct Recommendation {
    /// The objective, in words.
    pub objective: String,
    /// The p95 bound used, seconds.
    pub p95_bound_s: f64,
    /// The recommended policy index, if any beats the default.
    pub policy: Option<usize>,
    /// Why none, when none.
    pub reason: Option<String>,
    /// The saving, when a policy is recommended.
    pub saving: Option<Saving>,
}

/// Everything a sweep produces.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Sweep name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Knob names.
    pub knobs: Vec<String>,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// One row per run, sorted by (policy, seed).
    pub rows: Vec<RunRow>,
    /// One per policy, by index.
    pub policies: Vec<PolicySummary>,
    /// The recommendation.
    pub recommendation: Recommendation,
    /// Instance counts of the default policy (first seed).
    pub default_series: Series,
    /// Instance counts of the recommended policy (first seed), if any.
    pub recommended_series: Option<Series>,
    /// The config fragment of the recommended policy.
    pub fragment: Option<Value>,
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "(base)".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn key(s: &str) -> Value {
    Value::String(s.to_string())
}

/// The mapping at `path` under `root`, created when missing.
fn mapping_at<'a>(root: &'a mut Mapping, path: &[&str]) -> Result<&'a mut Mapping, String> {
    let mut m = root;
    for p in path {
        let entry = m
            .entry(key(p))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if entry.is_null() {
            *entry = Value::Mapping(Mapping::new());
        }
        m = entry
            .as_mapping_mut()
            .ok_or_else(|| format!("{p} is not a mapping in the base config"))?;
    }
    Ok(m)
}

/// The first cluster's mapping and its ID.
fn cluster_of(config: &mut Value) -> Result<(String, &mut Mapping), String> {
    let clusters = config
        .get_mut("Clusters")
        .and_then(Value::as_mapping_mut)
        .ok_or("the base config has no Clusters mapping")?;
    let (id, cluster) = clusters
        .iter_mut()
        .next()
        .ok_or("the base config has no cluster under Clusters")?;
    let id = id.as_str().unwrap_or_default().to_string();
    let cluster = cluster
        .as_mapping_mut()
        .ok_or("the cluster entry is not a mapping")?;
    Ok((id, cluster))
}

/// Applies one knob to a cluster mapping. `Null` leaves the mapping as it is. `dispatch-sim
/// whatif --change` applies its changes with it too.
pub fn apply_knob(
    cluster: &mut Mapping,
    name: &str,
    value: &Value,
    catalogues: &BTreeMap<String, Value>,
) -> Result<(), SweepError> {
    let err = |message: String| SweepError::Knob {
        knob: name.to_string(),
        value: show(value),
        message,
    };
    if value.is_null() {
        return Ok(());
    }
    let (path, leaf): (Vec<&str>, &str) = if name == "InstanceTypes" {
        let cat = value
            .as_str()
            .ok_or_else(|| err("expected the name of a catalogue".into()))?;
        let types = catalogues.get(cat).ok_or_else(|| {
            err(format!(
                "no catalogue {cat:?} (known: {})",
                catalogues.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        cluster.insert(key("InstanceTypes"), types.clone());
        return Ok(());
    } else if CONTAINERS_KNOBS.contains(&name) {
        (vec!["Containers"], name)
    } else if CLOUDVMS_KNOBS.contains(&name) {
        (vec!["Containers", "CloudVMs"], name)
    } else if let Some((path, leaf)) = name.rsplit_once('.') {
        (path.split('.').collect(), leaf)
    } else {
        return Err(err(format!(
            "unknown knob (known: InstanceTypes, {}, {}, or a dotted path under the cluster such as Containers.CloudVMs.TimeoutProbe)",
            CONTAINERS_KNOBS.join(", "),
            CLOUDVMS_KNOBS.join(", ")
        )));
    };
    let m = mapping_at(cluster, &path).map_err(err)?;
    m.insert(key(leaf), value.clone());
    Ok(())
}

fn invalid(path: &Path, message: String) -> SweepError {
    SweepError::Invalid {
        path: path.display().to_string(),
        message,
    }
}

impl Sweep {
    /// Reads a sweep file and its base scenario and prepares every policy.
    #[allow(clippy::disallowed_methods)]
    pub fn load(path: &Path) -> Result<Sweep, SweepError> {
        let text = std::fs::read_to_string(path).map_err(|source| SweepError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Sweep::parse(&text, path)
    }

    /// Parses sweep text; `path` names the file and resolves `base`.
    pub fn parse(text: &str, path: &Path) -> Result<Sweep, SweepError> {
        let file: SweepFile =
            serde_yaml::from_str(text).map_err(|e| invalid(path, e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let base_path = dir.join(&file.base);
        let base = Scenario::load(&base_path).map_err(|e| invalid(path, format!("base: {e}")))?;
        let base_dir = base_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let seeds = file.seeds.list();
        if seeds.is_empty() {
            return Err(invalid(path, "seeds: at least one seed is needed".into()));
        }
        let mut knobs = Vec::new();
        let mut lists: Vec<Vec<Value>> = Vec::new();
        for (k, v) in &file.grid {
            let name = k
                .as_str()
                .ok_or_else(|| invalid(path, format!("grid: knob name {k:?} is not a string")))?;
            let values = match v {
                Value::Sequence(s) if !s.is_empty() => s.clone(),
                other => {
                    return Err(invalid(
                        path,
                        format!(
                            "grid.{name}: expected a non-empty list of values, got {}",
                            show(other)
                        ),
                    ));
                }
            };
            // Every value must apply (unknown knobs and catalogues fail here, naming the value),
            // even when a sample does not pick it.
            for v in &values {
                apply_knob(&mut Mapping::new(), name, v, &file.catalogues)?;
            }
            knobs.push(name.to_string());
            lists.push(values);
        }
        for k in file.default.keys() {
            let name = k.as_str().unwrap_or_default();
            if !knobs.iter().any(|n| n == name) {
                return Err(invalid(
                    path,
                    format!("default.{name}: not a knob of the grid"),
                ));
            }
        }
        let default_values: Vec<Value> = knobs
            .iter()
            .map(|k| file.default.get(k.as_str()).cloned().unwrap_or(Value::Null))
            .collect();
        let total: usize = lists.iter().map(Vec::len).product();
        let mut chosen: Vec<usize> = (0..total).collect();
        if let Some(s) = &file.sample
            && s.count < total
        {
            let mut rng = Rng::derive(s.seed, "sweep-sample");
            for i in 0..s.count {
                let j = i + rng.below((total - i) as u64) as usize;
                chosen.swap(i, j);
            }
            chosen.truncate(s.count);
            chosen.sort_unstable();
        }
        let mut policies = vec![Policy {
            index: 0,
            label: "default".into(),
            values: default_values.clone(),
        }];
        for n in chosen {
            let mut rest = n;
            let mut values = vec![Value::Null; lists.len()];
            for (i, l) in lists.iter().enumerate().rev() {
                values[i] = l[rest % l.len()].clone();
                rest /= l.len();
            }
            if values == default_values {
                continue;
            }
            let index = policies.len();
            policies.push(Policy {
                index,
                label: format!("p{index:03}"),
                values,
            });
        }
        let mut cluster_id = String::new();
        let mut prepared = Vec::with_capacity(policies.len());
        for p in policies {
            let (id, prep) = prepare(&base, &knobs, p, &file)?;
            cluster_id = id;
            prepared.push(prep);
        }
        Ok(Sweep {
            file,
            knobs,
            policies: prepared,
            seeds,
            base_dir,
            cluster_id,
        })
    }

    /// Runs every (policy, seed) on the current rayon pool. `progress(done, total)` is called
    /// after each run (from any thread).
    pub fn run(&self, progress: impl Fn(usize, usize) + Sync) -> Result<Outcome, SweepError> {
        let jobs: Vec<(usize, u64, bool)> = self
            .policies
            .iter()
            .flat_map(|p| {
                self.seeds
                    .iter()
                    .enumerate()
                    .map(move |(i, s)| (p.policy.index, *s, i == 0))
            })
            .collect();
        let total = jobs.len();
        let done = AtomicUsize::new(0);
        let results: Vec<Result<(RunRow, Option<Series>), SweepError>> = jobs
            .par_iter()
            .map(|&(p, seed, first)| {
                let r = run_one(&self.policies[p], &self.knobs, &self.base_dir, seed, first);
                progress(done.fetch_add(1, Ordering::SeqCst) + 1, total);
                r
            })
            .collect();
        let mut rows = Vec::with_capacity(total);
        let mut series: BTreeMap<usize, Series> = BTreeMap::new();
        for r in results {
            let (row, s) = r?;
            if let Some(s) = s {
                series.insert(row.policy, s);
            }
            rows.push(row);
        }
        Ok(self.summarise(rows, series))
    }

    fn summarise(&self, rows: Vec<RunRow>, mut series: BTreeMap<usize, Series>) -> Outcome {
        let default_rows: BTreeMap<u64, &RunRow> = rows
            .iter()
            .filter(|r| r.policy == 0)
            .map(|r| (r.seed, r))
            .collect();
        let mut summaries: Vec<PolicySummary> = self
            .policies
            .iter()
            .map(|p| {
                let mine: Vec<&RunRow> = rows
                    .iter()
                    .filter(|r| r.policy == p.policy.index)
                    .collect();
                let n = mine.len().max(1) as f64;
                let mean = |f: &dyn Fn(&RunRow) -> f64| mine.iter().map(|r| f(r)).sum::<f64>() / n;
                let mut reason = None;
                for r in &mine {
                    // Containers lost: never ended, or cancelled by the dispatcher. Beyond the
                    // default policy's losses with the same seed, each spot reclaim may explain
                    // two (the cancelled container and its workflow supervisor, which the
                    // simulator leaves waiting; Arvados would retry the container request).
                    let lost = r.unfinished + r.cancelled_not_by_user;
                    let base = if p.policy.index == 0 {
                        0
                    } else {
                        default_rows
                            .get(&r.seed)
                            .map_or(0, |d| d.unfinished + d.cancelled_not_by_user)
                    };
                    let why = if r.invariant_violations > 0 {
                        Some(format!(
                            "seed {}: {} invariant violations",
                            r.seed, r.invariant_violations
                        ))
                    } else if lost.saturating_sub(base) > SPOT_LOSSES_PER_RECLAIM * r.reclaims {
                        Some(format!(
                            "seed {}: {} containers never ended and {} were cancelled by the dispatcher (default policy: {} lost), more than its {} spot reclaims explain",
                            r.seed, r.unfinished, r.cancelled_not_by_user, base, r.reclaims
                        ))
                    } else {
                        None
                    };
                    if why.is_some() {
                        reason = why;
                        break;
                    }
                }
                PolicySummary {
                    policy: p.policy.index,
                    label: p.policy.label.clone(),
                    knobs: knob_text(&self.knobs, &p.policy.values),
                    mean_cost_usd: mean(&|r| r.cost_usd),
                    mean_wait_p50_s: mean(&|r| r.wait_p50_s),
                    mean_wait_p95_s: mean(&|r| r.wait_p95_s),
                    worst_wait_p95_s: mine.iter().map(|r| r.wait_p95_s).fold(0.0, f64::max),
                    mean_instance_hours: mean(&|r| r.instance_hours),
                    mean_utilisation: mean(&|r| r.utilisation),
                    feasible: reason.is_none(),
                    infeasible_reason: reason,
                    pareto: false,
                }
            })
            .collect();
        // The Pareto front among feasible policies: no other feasible policy is at least as
        // good on both axes and better on one.
        let feasible: Vec<(usize, f64, f64)> = summaries
            .iter()
            .filter(|s| s.feasible)
            .map(|s| (s.policy, s.mean_cost_usd, s.mean_wait_p95_s))
            .collect();
        for s in summaries.iter_mut().filter(|s| s.feasible) {
            let (c, w) = (s.mean_cost_usd, s.mean_wait_p95_s);
            s.pareto = !feasible
                .iter()
                .any(|&(i, c2, w2)| i != s.policy && c2 <= c && w2 <= w && (c2 < c || w2 < w));
        }
        let recommendation = self.recommend(&summaries, &rows);
        let fragment = recommendation
            .policy
            .map(|i| self.fragment(&self.policies[i].policy));
        let recommended_series = recommendation.policy.and_then(|i| series.remove(&i));
        Outcome {
            name: self.file.name.clone(),
            description: self.file.description.clone(),
            knobs: self.knobs.clone(),
            seeds: self.seeds.clone(),
            default_series: series.remove(&0).unwrap_or_default(),
            recommended_series,
            rows,
            policies: summaries,
            recommendation,
            fragment,
        }
    }

    fn recommend(&self, summaries: &[PolicySummary], rows: &[RunRow]) -> Recommendation {
        let d = &summaries[0];
        let (bound, objective) = match self.file.objective.max_p95_wait {
            Some(w) => {
                let b = w.0.as_secs_f64();
                (
                    b,
                    format!(
                        "the cheapest policy (mean cost over seeds) whose mean p95 wait is at most {b:.0}s"
                    ),
                )
            }
            None => {
                let r = self.file.objective.max_p95_ratio;
                (
                    d.mean_wait_p95_s * r,
                    if r == 1.0 {
                        "the cheapest policy (mean cost over seeds) whose mean p95 wait is no worse than the default policy's".to_string()
                    } else {
                        format!(
                            "the cheapest policy (mean cost over seeds) whose mean p95 wait is at most {r} × the default policy's"
                        )
                    },
                )
            }
        };
        let best = summaries
            .iter()
            .filter(|s| s.feasible && s.mean_wait_p95_s <= bound + 1e-9)
            .min_by(|a, b| {
                a.mean_cost_usd
                    .total_cmp(&b.mean_cost_usd)
                    .then(a.policy.cmp(&b.policy))
            });
        let none = |reason: String| Recommendation {
            objective: objective.clone(),
            p95_bound_s: bound,
            policy: None,
            reason: Some(reason),
            saving: None,
        };
        let Some(best) = best else {
            return none(format!(
                "no feasible policy has a mean p95 wait within {bound:.1}s{}",
                if d.feasible {
                    String::new()
                } else {
                    format!(
                        " (the default policy itself is infeasible: {})",
                        d.infeasible_reason.clone().unwrap_or_default()
                    )
                }
            ));
        };
        if best.policy == 0 || best.mean_cost_usd >= d.mean_cost_usd {
            return none(format!(
                "no policy in the sweep is cheaper than the default (${:.2} mean) at a mean p95 wait within {bound:.1}s; the cheapest policies all wait longer (see the Pareto chart)",
                d.mean_cost_usd
            ));
        }
        let mut per_seed = BTreeMap::new();
        for s in &self.seeds {
            let cost = |p: usize| {
                rows.iter()
                    .find(|r| r.policy == p && r.seed == *s)
                    .map(|r| r.cost_usd)
            };
            if let (Some(dc), Some(bc)) = (cost(0), cost(best.policy))
                && dc > 0.0
            {
                per_seed.insert(*s, (dc - bc) / dc * 100.0);
            }
        }
        let v: Vec<f64> = per_seed.values().copied().collect();
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        Recommendation {
            objective,
            p95_bound_s: bound,
            policy: Some(best.policy),
            reason: None,
            saving: Some(Saving {
                mean_percent: mean,
                min_percent: v.iter().copied().fold(f64::INFINITY, f64::min),
                max_percent: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                stddev_percent: var.sqrt(),
                of_mean_cost_percent: (d.mean_cost_usd - best.mean_cost_usd) / d.mean_cost_usd
                    * 100.0,
                per_seed,
            }),
        }
    }

    /// The config fragment that changes the default policy into `p`: the knobs whose values
    /// differ from the default policy's (`null` knobs are left out). Merged into the base
    /// config, it gives the policy's config.
    pub fn fragment(&self, p: &Policy) -> Value {
        let mut cluster = Mapping::new();
        let default = &self.policies[0].policy.values;
        for ((k, v), d) in self.knobs.iter().zip(&p.values).zip(default) {
            if v == d {
                continue;
            }
            // The knobs were applied to the base config already, so this cannot fail; a
            // failure would only drop the knob from the fragment.
            let _ = apply_knob(&mut cluster, k, v, &self.file.catalogues);
        }
        let mut clusters = Mapping::new();
        clusters.insert(key(&self.cluster_id), Value::Mapping(cluster));
        let mut root = Mapping::new();
        root.insert(key("Clusters"), Value::Mapping(clusters));
        Value::Mapping(root)
    }
}

fn knob_text(knobs: &[String], values: &[Value]) -> BTreeMap<String, String> {
    knobs
        .iter()
        .zip(values)
        .map(|(k, v)| (k.clone(), show(v)))
        .collect()
}

/// Applies a policy to the base scenario and works out the billing prices.
fn prepare(
    base: &Scenario,
    knobs: &[String],
    policy: Policy,
    file: &SweepFile,
) -> Result<(String, Prepared), SweepError> {
    let mut scenario = base.clone();
    let label = policy.label.clone();
    let bad = |message: String| SweepError::Run {
        policy: label.clone(),
        seed: 0,
        message,
    };
    let (cluster_id, always_preemptible) = {
        let (id, cluster) = cluster_of(&mut scenario.config).map_err(&bad)?;
        for (k, v) in knobs.iter().zip(&policy.values) {
            apply_knob(cluster, k, v, &file.catalogues)?;
        }
        let always = cluster
            .get("Containers")
            .and_then(|c| c.get("AlwaysUsePreemptibleInstances"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        (id, always)
    };
    let text = serde_yaml::to_string(&scenario.config).map_err(|e| bad(e.to_string()))?;
    let loaded = arvados_dispatch_cloud::config::load_str(&text, "config")
        .map_err(|e| bad(format!("config: {e}")))?;
    let types = &loaded.core.instance_types;
    if always_preemptible && types.values().any(|t| t.preemptible) {
        for g in &mut scenario.workload.generators {
            if let Some(w) = &mut g.workflow {
                w.child.preemptible = 1.0;
            }
        }
    }
    let mut billed_price = BTreeMap::new();
    for t in types.values() {
        let mut price = t.price;
        if t.preemptible {
            let base_name = t.name.strip_suffix(".preemptible").unwrap_or(&t.name);
            let market = file
                .spot_prices
                .get(base_name)
                .or_else(|| file.spot_prices.get(&t.provider_type))
                .copied();
            if let Some(m) = market {
                if m > t.price {
                    // The bid is under the market price: every launch fails.
                    scenario.cloud.capacity.push(CapacitySpec {
                        instance_type: Some(t.name.clone()),
                        quota_group: None,
                        probability: 1.0,
                        window: None,
                    });
                } else {
                    price = m;
                }
            }
        }
        billed_price.insert(t.name.clone(), price);
    }
    Ok((
        cluster_id,
        Prepared {
            policy,
            scenario,
            billed_price,
        },
    ))
}

/// Follows the event log as it is written and records instance counts by type (the what-if
/// runs use it too, with the forked instances entered in `type_of`).
#[derive(Default)]
pub(crate) struct Tracker {
    partial: Vec<u8>,
    create_op: BTreeMap<String, String>,
    destroy_op: BTreeMap<String, (u64, String)>,
    pub(crate) type_of: BTreeMap<String, String>,
    pub(crate) changes: Vec<(u64, String, i32)>,
}

impl Tracker {
    fn line(&mut self, line: &str) {
        let mut t = line.split(' ');
        let (Some(now), Some(kind)) = (t.next(), t.next()) else {
            return;
        };
        let Ok(now) = now.parse::<u64>() else {
            return;
        };
        match kind {
            "C" => {
                let (Some(op), Some(what), Some(arg)) = (t.next(), t.next(), t.next()) else {
                    return;
                };
                match what {
                    "Create" => {
                        self.create_op.insert(op.to_string(), arg.to_string());
                    }
                    "Destroy" => {
                        self.destroy_op
                            .insert(op.to_string(), (now, arg.to_string()));
                    }
                    _ => {}
                }
            }
            "I" => {
                let (Some(op), Some(what), Some(arg)) = (t.next(), t.next(), t.next()) else {
                    return;
                };
                match what {
                    "Created" => {
                        if let Some(ty) = self.create_op.remove(op)
                            && arg != "err"
                        {
                            self.type_of.insert(arg.to_string(), ty.clone());
                            self.changes.push((now, ty, 1));
                        }
                    }
                    "Destroyed" => {
                        if let Some((at, id)) = self.destroy_op.remove(op)
                            && arg == "ok"
                        {
                            self.gone(at, &id);
                        }
                    }
                    _ => {}
                }
            }
            "R" => {
                if let Some(id) = t.next() {
                    self.gone(now, id);
                }
            }
            _ => {}
        }
    }

    fn gone(&mut self, at: u64, id: &str) {
        if let Some(ty) = self.type_of.remove(id) {
            self.changes.push((at, ty, -1));
        }
    }
}

pub(crate) struct TrackerWriter(pub(crate) Rc<RefCell<Tracker>>);

impl Write for TrackerWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut t = self.0.borrow_mut();
        let mut rest = buf;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            let (head, tail) = rest.split_at(nl);
            let line = if t.partial.is_empty() {
                String::from_utf8_lossy(head).into_owned()
            } else {
                let mut all = std::mem::take(&mut t.partial);
                all.extend_from_slice(head);
                String::from_utf8_lossy(&all).into_owned()
            };
            t.line(&line);
            rest = &tail[1..];
        }
        t.partial.extend_from_slice(rest);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs one policy with one seed.
fn run_one(
    p: &Prepared,
    knobs: &[String],
    dir: &Path,
    seed: u64,
    want_series: bool,
) -> Result<(RunRow, Option<Series>), SweepError> {
    let tracker = Rc::new(RefCell::new(Tracker::default()));
    let log: Option<Box<dyn Write>> =
        want_series.then(|| Box::new(TrackerWriter(tracker.clone())) as Box<dyn Write>);
    let mut w = crate::world::World::new(p.scenario.clone(), dir, seed, log).map_err(|e| {
        SweepError::Run {
            policy: p.policy.label.clone(),
            seed,
            message: e.to_string(),
        }
    })?;
    w.run(|_, _| {});
    let r = crate::report::build(&w, 0.0);
    let end_ms = w.now;
    drop(w);
    let cost_usd = r
        .instances
        .hours_by_type
        .iter()
        .map(|(t, h)| {
            h * p
                .billed_price
                .get(t)
                .copied()
                .unwrap_or_else(|| r.cost_usd / r.instances.hours_by_type.values().sum::<f64>())
        })
        .sum();
    let user_cancels = r
        .containers
        .cancel_reasons
        .get(USER_CANCEL)
        .copied()
        .unwrap_or(0);
    let row = RunRow {
        policy: p.policy.index,
        label: p.policy.label.clone(),
        knobs: knob_text(knobs, &p.policy.values),
        seed,
        cost_usd,
        cost_at_bid_usd: r.cost_usd,
        wait_p50_s: r.wait_seconds.p50,
        wait_p95_s: r.wait_seconds.p95,
        wait_max_s: r.wait_seconds.max,
        containers: r.containers.total,
        completed: r.containers.completed,
        cancelled: r.containers.cancelled,
        cancelled_not_by_user: r.containers.cancelled - user_cancels,
        unfinished: r.containers.unfinished,
        instance_hours: r.instances.hours_by_type.values().sum(),
        utilisation: r.utilisation,
        instances_created: r.instances.created,
        instances_peak: r.instances.peak,
        reclaims: r.instances.reclaimed,
        invariant_violations: r.invariant_violations,
        sim_seconds: r.sim_seconds,
        event_log_hash: r.event_log_hash,
    };
    let series = want_series.then(|| {
        let mut t = tracker.borrow_mut();
        let mut changes = std::mem::take(&mut t.changes);
        changes.sort_by_key(|c| c.0);
        Series { changes, end_ms }
    });
    Ok((row, series))
}

/// CSV text of the rows: fixed columns, then one column per knob (in grid order).
pub fn csv(o: &Outcome) -> String {
    use std::fmt::Write as _;
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut s = String::from("policy,label,seed");
    for k in &o.knobs {
        let _ = write!(s, ",{}", quote(k));
    }
    s.push_str(",cost_usd,cost_at_bid_usd,wait_p50_s,wait_p95_s,wait_max_s,containers,completed,cancelled,cancelled_not_by_user,unfinished,instance_hours,utilisation,instances_created,instances_peak,reclaims,invariant_violations,sim_seconds,event_log_hash\n");
    for r in &o.rows {
        let _ = write!(s, "{},{},{}", r.policy, r.label, r.seed);
        for k in &o.knobs {
            let _ = write!(s, ",{}", quote(r.knobs.get(k).map_or("", String::as_str)));
        }
        let _ = writeln!(
            s,
            ",{:.4},{:.4},{:.1},{:.1},{:.1},{},{},{},{},{},{:.3},{:.4},{},{},{},{},{:.0},{}",
            r.cost_usd,
            r.cost_at_bid_usd,
            r.wait_p50_s,
            r.wait_p95_s,
            r.wait_max_s,
            r.containers,
            r.completed,
            r.cancelled,
            r.cancelled_not_by_user,
            r.unfinished,
            r.instance_hours,
            r.utilisation,
            r.instances_created,
            r.instances_peak,
            r.reclaims,
            r.invariant_violations,
            r.sim_seconds,
            r.event_log_hash
        );
    }
    s
}

/// The results.json document: the rows, the per-policy summaries and the recommendation.
pub fn json(o: &Outcome) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        sweep: &'a str,
        knobs: &'a [String],
        seeds: &'a [u64],
        runs: &'a [RunRow],
        policies: &'a [PolicySummary],
        recommendation: &'a Recommendation,
    }
    let doc = Doc {
        sweep: &o.name,
        knobs: &o.knobs,
        seeds: &o.seeds,
        runs: &o.rows,
        policies: &o.policies,
        recommendation: &o.recommendation,
    };
    serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
}

/// The recommendation.yml text.
pub fn recommendation_yaml(o: &Outcome) -> String {
    let rec = &o.recommendation;
    let d = &o.policies[0];
    let mut root = Mapping::new();
    root.insert(key("sweep"), key(&o.name));
    root.insert(key("objective"), key(&rec.objective));
    let policy_map = |p: &PolicySummary| {
        let mut m = Mapping::new();
        m.insert(key("label"), key(&p.label));
        // Knob values as YAML scalars again (numbers, booleans, durations as written).
        let knobs: Mapping = p
            .knobs
            .iter()
            .map(|(k, v)| (key(k), serde_yaml::from_str(v).unwrap_or_else(|_| key(v))))
            .collect();
        m.insert(key("knobs"), Value::Mapping(knobs));
        m.insert(key("mean_cost_usd"), num(p.mean_cost_usd));
        m.insert(key("mean_wait_p95_s"), num(p.mean_wait_p95_s));
        m.insert(key("mean_wait_p50_s"), num(p.mean_wait_p50_s));
        Value::Mapping(m)
    };
    root.insert(key("default"), policy_map(d));
    match rec.policy {
        Some(i) => {
            root.insert(key("recommended"), policy_map(&o.policies[i]));
            if let Some(s) = &rec.saving {
                root.insert(
                    key("saving_percent"),
                    serde_yaml::to_value(s).unwrap_or(Value::Null),
                );
            }
            root.insert(key("config"), o.fragment.clone().unwrap_or(Value::Null));
        }
        None => {
            root.insert(key("recommended"), Value::Null);
            root.insert(
                key("reason"),
                key(rec.reason.as_deref().unwrap_or_default()),
            );
        }
    }
    let body = serde_yaml::to_string(&Value::Mapping(root)).unwrap_or_default();
    format!(
        "# dispatch-sim sweep: the recommended policy. Merge `config` into the cluster config;\n# `saving_percent` is the saving against the default policy, per seed and its spread.\n{body}"
    )
}

fn num(x: f64) -> Value {
    Value::Number(serde_yaml::Number::from((x * 1000.0).round() / 1000.0))
}

/// Writes results.csv, results.json, recommendation.yml and report.html into `dir`.
#[allow(clippy::disallowed_methods)]
pub fn write_outputs(o: &Outcome, dir: &Path) -> Result<(), SweepError> {
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| SweepError::Write {
            path: path.display().to_string(),
            source,
        })
    };
    std::fs::create_dir_all(dir).map_err(|source| SweepError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    write("results.csv", csv(o))?;
    write("results.json", json(o))?;
    write("recommendation.yml", recommendation_yaml(o))?;
    write("report.html", crate::report_html::render(o))?;
    Ok(())
}
