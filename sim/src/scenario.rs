//! Scenario files: a cluster config, a workload, a fault plan, a duration, a seed and
//! expectations, in YAML. Field names are checked (`deny_unknown_fields`), and every error names
//! the field and the value, with the line and column.
//!
//! The `config:` block holds an Arvados cluster config with the same keys as
//! `/etc/arvados/config.yml` (`Clusters: {zzzzz: {...}}`), loaded by the dispatcher's own loader,
//! so an operator can paste theirs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use arvados_dispatch_cloud::config::units::parse_byte_size;
use serde::Deserialize;

use crate::dist::{Dist, Dur};

/// A byte size written as in Arvados configs (`"4GiB"`, `"500MB"`, or a number of bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes(pub i64);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            N(i64),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Bytes(n)),
            Raw::S(s) => parse_byte_size(&s)
                .map(Bytes)
                .map_err(|e| serde::de::Error::custom(format!("invalid byte size {s:?}: {e}"))),
        }
    }
}

/// A whole scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name.
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// Root seed (overridden by `--seed`).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Simulated time limit.
    pub duration: Dur,
    /// The Arvados cluster config.
    pub config: serde_yaml::Value,
    /// Implementation knobs with no Arvados key.
    #[serde(default)]
    pub tuning: TuningSpec,
    /// The simulated cloud.
    #[serde(default)]
    pub cloud: CloudSpec,
    /// The simulated controller.
    #[serde(default)]
    pub controller: ControllerSpec,
    /// The simulated VMs and crunch-run.
    #[serde(default)]
    pub vms: VmSpec,
    /// What runs.
    pub workload: WorkloadSpec,
    /// Dispatcher restarts (state dropped and rebuilt from cloud tags) at these times.
    #[serde(default)]
    pub restarts: Vec<Dur>,
    /// When every container has ended, keep running this long so idle VMs shut down.
    #[serde(default = "default_settle")]
    pub settle: Dur,
    /// Run the core's `check_invariants()` every this many events (1 = every step; large
    /// scenarios may check less often to stay fast). Ground-truth checks always run.
    #[serde(default = "default_check_every")]
    pub check_every: u64,
    /// What must hold at the end.
    #[serde(default)]
    pub expect: Expect,
}

fn default_check_every() -> u64 {
    1
}

fn default_seed() -> u64 {
    1
}

fn default_settle() -> Dur {
    Dur(Duration::from_secs(600))
}

/// Tuning overrides.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuningSpec {
    /// `Tuning.schedule_min_interval`.
    pub schedule_min_interval: Option<Dur>,
}

/// A time window.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Start.
    pub from: Dur,
    /// End (exclusive).
    pub to: Dur,
}

impl Window {
    /// Whether `t` (ms since start) is inside.
    pub fn contains(&self, t_ms: u64) -> bool {
        let ms = |d: Dur| d.0.as_millis() as u64;
        t_ms >= ms(self.from) && t_ms < ms(self.to)
    }
}

/// Account quota.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// Most instances at once.
    pub max_instances: Option<usize>,
    /// Most vCPUs at once.
    pub max_vcpus: Option<i64>,
    /// Per quota group (the instance type's quota group): most vCPUs at once.
    #[serde(default)]
    pub group_max_vcpus: BTreeMap<String, i64>,
}

/// Capacity errors for a type (by name or ProviderType) or a quota group.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacitySpec {
    /// Instance type name or ProviderType.
    pub instance_type: Option<String>,
    /// Quota group (errors are then group-scoped).
    pub quota_group: Option<String>,
    /// Probability that a create in the window fails.
    #[serde(default = "one")]
    pub probability: f64,
    /// Only inside this window (default: always).
    pub window: Option<Window>,
}

fn one() -> f64 {
    1.0
}

/// The simulated cloud.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudSpec {
    /// Create call latency.
    pub create_latency: Dist<Dur>,
    /// Destroy call latency.
    pub destroy_latency: Dist<Dur>,
    /// List call latency.
    pub list_latency: Dist<Dur>,
    /// SetTags call latency.
    pub set_tags_latency: Dist<Dur>,
    /// Time from create to SSH accepting connections.
    pub ssh_ready: Dist<Dur>,
    /// Time from create to the boot probe passing (at least `ssh_ready`).
    pub boot_time: Dist<Dur>,
    /// Account quota.
    pub quota: QuotaSpec,
    /// Capacity errors.
    pub capacity: Vec<CapacitySpec>,
    /// Instances created under these rules are dead on arrival: they never accept SSH, so they
    /// never boot (the rule's `probability` and `window` apply as for capacity errors).
    pub dead_on_arrival: Vec<CapacitySpec>,
    /// Creates closer together than this get a rate-limit error.
    pub min_time_between_creates: Dur,
    /// Lists closer together than this get a rate-limit error.
    pub min_time_between_lists: Dur,
    /// Probability that a create fails with a transient error.
    pub create_error_rate: f64,
    /// Probability that a destroy fails.
    pub destroy_error_rate: f64,
    /// Probability that a new instance never boots.
    pub never_boot_rate: f64,
    /// Probability that a new instance breaks (every command fails) some time after boot.
    pub broken_rate: f64,
    /// When a breaking instance breaks, after its boot.
    pub broken_after: Dist<Dur>,
    /// Probability that a new instance's crunch-run reports `broken` some time after boot.
    pub report_broken_rate: f64,
    /// Probability that a new instance has no crunch-run (the run probe always fails).
    pub crunch_run_missing_rate: f64,
    /// Spot reclaims per preemptible instance-hour.
    pub spot_reclaims_per_hour: f64,
    /// Warning time before a reclaim (logged).
    pub spot_notice: Dur,
    /// A new instance shows up in listings only this long after it was created.
    pub list_lag: Dur,
}

impl Default for CloudSpec {
    fn default() -> Self {
        CloudSpec {
            create_latency: Dist::fixed(Duration::from_secs(2)),
            destroy_latency: Dist::fixed(Duration::from_secs(1)),
            list_latency: Dist::fixed(Duration::from_millis(500)),
            set_tags_latency: Dist::fixed(Duration::from_millis(300)),
            ssh_ready: Dist::fixed(Duration::from_secs(20)),
            boot_time: Dist::fixed(Duration::from_secs(45)),
            quota: QuotaSpec::default(),
            capacity: Vec::new(),
            dead_on_arrival: Vec::new(),
            min_time_between_creates: Dur::default(),
            min_time_between_lists: Dur::default(),
            create_error_rate: 0.0,
            destroy_error_rate: 0.0,
            never_boot_rate: 0.0,
            broken_rate: 0.0,
            broken_after: Dist::fixed(Duration::from_secs(60)),
            report_broken_rate: 0.0,
            crunch_run_missing_rate: 0.0,
            spot_reclaims_per_hour: 0.0,
            spot_notice: Dur(Duration::from_secs(120)),
            list_lag: Dur::default(),
        }
    }
}

/// The simulated controller.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerSpec {
    /// Latency of each API call.
    pub request_latency: Dist<Dur>,
    /// Overrides `Containers.MaxDispatchAttempts`.
    pub max_dispatch_attempts: Option<i64>,
    /// Every call inside these windows answers 503.
    pub outages: Vec<Window>,
}

impl Default for ControllerSpec {
    fn default() -> Self {
        ControllerSpec {
            request_latency: Dist::fixed(Duration::from_millis(20)),
            max_dispatch_attempts: None,
            outages: Vec::new(),
        }
    }
}

/// The simulated VMs and crunch-run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmSpec {
    /// Latency of each remote command.
    pub command_latency: Dist<Dur>,
    /// Probability that a started container crashes (half before Running, half after).
    pub crash_rate: f64,
    /// Probability that a container ignores SIGTERM.
    pub ignore_term_rate: f64,
    /// Time from `--detach` to the container reaching Running.
    pub setup_time: Dist<Dur>,
    /// After crunch-run exits, `--list` shows the container as stale for this long.
    pub stale_lag: Dist<Dur>,
    /// Probability that the stale entry never goes away (arv-mount deadlock).
    pub stale_deadlock_rate: f64,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            command_latency: Dist::fixed(Duration::from_millis(50)),
            crash_rate: 0.0,
            ignore_term_rate: 0.0,
            setup_time: Dist::fixed(Duration::ZERO),
            stale_lag: Dist::fixed(Duration::ZERO),
            stale_deadlock_rate: 0.0,
        }
    }
}

/// The shape of a container.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    /// `runtime_constraints.vcpus`.
    pub vcpus: Dist<f64>,
    /// `runtime_constraints.ram`, GiB.
    pub ram_gib: Dist<f64>,
    /// `runtime_constraints.keep_cache_disk`, GiB (scratch).
    #[serde(default = "zero_dist")]
    pub scratch_gib: Dist<f64>,
    /// GPUs (cuda, driver 11.0, capability 8.0) when > 0.
    #[serde(default = "zero_dist")]
    pub gpus: Dist<f64>,
    /// How long the payload runs.
    pub runtime: Dist<Dur>,
    /// Probability that it asks for a preemptible instance.
    #[serde(default)]
    pub preemptible: f64,
    /// Priority.
    #[serde(default = "default_priority")]
    pub priority: Dist<f64>,
}

fn zero_dist() -> Dist<f64> {
    Dist::Fixed(0.0)
}

fn default_priority() -> Dist<f64> {
    Dist::Fixed(500.0)
}

/// Arrival process of a generator: `batch`, `{poisson: {per_hour: R}}` or
/// `{bursts: {size: N, every: D}}`.
#[derive(Clone, Debug)]
pub enum Arrival {
    /// All at once, at `start`.
    Batch,
    /// Poisson arrivals at this rate per hour.
    Poisson {
        /// Mean arrivals per hour.
        per_hour: f64,
    },
    /// Bursts of `size` every `every`, starting at `start`.
    Bursts {
        /// Containers per burst.
        size: usize,
        /// Time between bursts.
        every: Dur,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoissonRaw {
    per_hour: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BurstsRaw {
    size: usize,
    every: Dur,
}

impl<'de> Deserialize<'de> for Arrival {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Arrival, D::Error> {
        use serde::de::Error;
        let v = serde_yaml::Value::deserialize(d)?;
        let want =
            "expected `batch`, `{poisson: {per_hour: R}}` or `{bursts: {size: N, every: D}}`";
        match &v {
            serde_yaml::Value::String(s) if s == "batch" => Ok(Arrival::Batch),
            serde_yaml::Value::Mapping(m) if m.len() == 1 => {
                let (k, inner) = m.iter().next().expect("one entry");
                match k.as_str() {
                    Some("poisson") => serde_yaml::from_value::<PoissonRaw>(inner.clone())
                        .map(|p| Arrival::Poisson {
                            per_hour: p.per_hour,
                        })
                        .map_err(|e| D::Error::custom(format!("poisson: {e}"))),
                    Some("bursts") => serde_yaml::from_value::<BurstsRaw>(inner.clone())
                        .map(|b| Arrival::Bursts {
                            size: b.size,
                            every: b.every,
                        })
                        .map_err(|e| D::Error::custom(format!("bursts: {e}"))),
                    Some("batch") => Ok(Arrival::Batch),
                    _ => Err(D::Error::custom(format!("unknown arrival {k:?}: {want}"))),
                }
            }
            other => Err(D::Error::custom(format!(
                "invalid arrival {other:?}: {want}"
            ))),
        }
    }
}

/// A workflow: a supervisor container that submits children while it runs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSpec {
    /// Number of children per workflow.
    pub children: Dist<f64>,
    /// Time between child submissions.
    pub child_interval: Dist<Dur>,
    /// Child shape.
    pub child: Shape,
}

/// A generator of containers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generator {
    /// How many containers (or workflows).
    pub count: usize,
    /// When the first arrives.
    #[serde(default)]
    pub start: Dur,
    /// Arrival process.
    pub arrival: Arrival,
    /// Container shape (for workflows: the supervisor's).
    pub shape: Shape,
    /// Makes each generated container a workflow supervisor.
    pub workflow: Option<WorkflowSpec>,
    /// Probability that the user cancels the container (priority set to 0) after `cancel_after`.
    #[serde(default)]
    pub cancel_rate: f64,
    /// When cancelled containers are cancelled, after arrival.
    #[serde(default = "default_cancel_after")]
    pub cancel_after: Dist<Dur>,
}

fn default_cancel_after() -> Dist<Dur> {
    Dist::fixed(Duration::from_secs(600))
}

/// One explicit container (or `count` identical ones).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplicitContainer {
    /// Arrival time.
    #[serde(default)]
    pub at: Dur,
    /// Copies.
    #[serde(default = "one_usize")]
    pub count: usize,
    /// VCPUs.
    pub vcpus: i64,
    /// RAM.
    pub ram: Bytes,
    /// Keep cache on disk (scratch).
    #[serde(default)]
    pub scratch: Bytes,
    /// GPUs.
    #[serde(default)]
    pub gpus: i64,
    /// Payload run time.
    pub runtime: Dur,
    /// Priority.
    #[serde(default = "default_priority_i")]
    pub priority: i64,
    /// Preemptible.
    #[serde(default)]
    pub preemptible: bool,
    /// Supervisor (counts against SupervisorFraction).
    #[serde(default)]
    pub supervisor: bool,
    /// User cancels it this long after arrival.
    pub cancel_after: Option<Dur>,
}

fn one_usize() -> usize {
    1
}

fn default_priority_i() -> i64 {
    500
}

/// What runs.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadSpec {
    /// Explicit containers.
    pub containers: Vec<ExplicitContainer>,
    /// Generators.
    pub generators: Vec<Generator>,
    /// A CSV trace (path relative to the scenario file); see docs/simulation.md.
    pub trace: Option<String>,
}

/// What must hold at the end. Invariant violations always fail a run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Expect {
    /// Every container ended (Complete or Cancelled).
    pub all_ended: bool,
    /// At least this many Complete.
    pub completed_min: Option<usize>,
    /// At most this many Cancelled.
    pub cancelled_max: Option<usize>,
    /// At most this many leaked instances.
    pub leaked_max: usize,
    /// At most this many dollars.
    pub cost_max_usd: Option<f64>,
    /// 95th percentile wait to start at most this.
    pub wait_p95_max: Option<Dur>,
    /// At least this many instances created.
    pub instances_created_min: Option<usize>,
    /// No container payload started twice.
    pub no_double_start: bool,
    /// Boot outcomes that must have happened at least once.
    pub boot_outcomes: Vec<String>,
    /// Scheduler gauges that must have been non-zero at some point.
    pub nonzero: Vec<String>,
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            all_ended: true,
            completed_min: None,
            cancelled_max: None,
            leaked_max: 0,
            cost_max_usd: None,
            wait_p95_max: None,
            instances_created_min: None,
            no_double_start: true,
            boot_outcomes: Vec::new(),
            nonzero: Vec::new(),
        }
    }
}

/// Why a scenario could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Unreadable file.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Bad YAML or a bad field.
    #[error("{path}: {message}")]
    Invalid {
        /// File.
        path: String,
        /// What is wrong (field, value, position).
        message: String,
    },
}

impl Scenario {
    /// Reads a scenario file (loading is the one place the simulator reads files).
    #[allow(clippy::disallowed_methods)]
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Scenario::parse(&text, &path.display().to_string())
    }

    /// Parses scenario text.
    pub fn parse(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = serde_yaml::from_str(text).map_err(|e| ScenarioError::Invalid {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        s.validate(origin)?;
        Ok(s)
    }

    fn validate(&self, origin: &str) -> Result<(), ScenarioError> {
        let bad = |field: &str, msg: String| {
            Err(ScenarioError::Invalid {
                path: origin.to_string(),
                message: format!("{field}: {msg}"),
            })
        };
        let rates = [
            ("cloud.create_error_rate", self.cloud.create_error_rate),
            ("cloud.destroy_error_rate", self.cloud.destroy_error_rate),
            ("cloud.never_boot_rate", self.cloud.never_boot_rate),
            ("cloud.broken_rate", self.cloud.broken_rate),
            ("cloud.report_broken_rate", self.cloud.report_broken_rate),
            (
                "cloud.crunch_run_missing_rate",
                self.cloud.crunch_run_missing_rate,
            ),
            ("vms.crash_rate", self.vms.crash_rate),
            ("vms.ignore_term_rate", self.vms.ignore_term_rate),
            ("vms.stale_deadlock_rate", self.vms.stale_deadlock_rate),
        ];
        for (field, v) in rates {
            if !(0.0..=1.0).contains(&v) {
                return bad(
                    field,
                    format!("invalid probability {v}: must be between 0 and 1"),
                );
            }
        }
        if self.duration.0.is_zero() {
            return bad("duration", "must be more than 0".into());
        }
        for (i, g) in self.workload.generators.iter().enumerate() {
            if let Arrival::Poisson { per_hour } = g.arrival
                && per_hour <= 0.0
            {
                return bad(
                    &format!("workload.generators[{i}].arrival.poisson.per_hour"),
                    format!("invalid rate {per_hour}: must be more than 0"),
                );
            }
        }
        Ok(())
    }
}
