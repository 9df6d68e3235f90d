//! Snapshots of the dispatcher's state for what-if simulations (docs/pricing.md, "What-if").
//!
//! [`build`] turns what a [`Dispatcher`] knows at one time into a [`Snapshot`]: the containers
//! of its queue, its instances, the effective config in the Arvados layout, and statistics of
//! recent arrivals and run times. The management API serves it (`GET
//! /arvados/v1/dispatch/snapshot`); `dispatch-sim run --snapshot-at` writes the same thing from a
//! simulated dispatcher; `dispatch-sim whatif` reads it and forks the state into the simulator.
//!
//! [`History`] collects the statistics. The queue feeds it as polls show containers appear, start
//! running and end ([`crate::core::queue::Queue::apply_poll`]). Invariants: it is bounded
//! ([`ARRIVALS_MAX`], [`FINISHED_MAX`]; the running map is pruned to the queue's size, and the
//! table of classes to the classes those records use, whenever it has doubled since the last
//! pruning, so that pruning costs O(1) per record); it only counts an arrival whose `created_at` is at or after the start of its
//! observations, so containers that existed before the dispatcher started (after a restart, all
//! of them) are not mistaken for a burst; a run time is recorded only for a container seen
//! before it ran and seen again once it had ended.
//!
//! Secrets never enter the core ([`crate::core::config`]), so the rendered config cannot hold a
//! token, a private key or a cloud credential; instance tags (which hold each instance's secret)
//! are left out.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::config::Config;
use super::dispatcher::Dispatcher;
use super::queue::QueueEntry;
use super::select::TypeId;
use super::time::Timestamp;
use super::types::{
    Container, ContainerState, GpuRequest, InstanceType, Resources, RuntimeConstraints,
    SchedulingParameters,
};

/// The `format` field of every snapshot.
pub const FORMAT: &str = "arvados-dispatch-cloud snapshot";

/// The snapshot format version. Adding fields keeps it; changing or removing one bumps it.
pub const VERSION: u32 = 1;

/// Arrivals are counted over this window before the snapshot.
pub const ARRIVAL_WINDOW: Duration = Duration::from_secs(3600);

/// Run times are kept for containers that ended within this window before the snapshot.
pub const RUNTIME_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Most arrivals remembered; beyond it the oldest go, and the observed window shrinks to match.
pub const ARRIVALS_MAX: usize = 200_000;

/// Most run times remembered.
pub const FINISHED_MAX: usize = 20_000;

/// The class table is first pruned (classes no record refers to are dropped) at this size,
/// then each time it has doubled since the last pruning.
pub const CLASSES_PRUNE_AT: usize = 4096;

/// Run-time samples listed per class in a snapshot (the most recent ones).
pub const SAMPLES_PER_CLASS_MAX: usize = 200;

/// What a container asks for: the key of the arrival statistics.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Class {
    /// `runtime_constraints.vcpus`.
    pub vcpus: i64,
    /// `runtime_constraints.ram`.
    pub ram: i64,
    /// `runtime_constraints.keep_cache_ram`.
    pub keep_cache_ram: i64,
    /// The scratch space it needs (keep cache on disk, tmp mounts, image), bytes.
    pub scratch: i64,
    /// GPU request: stack, count, driver version, hardware targets, VRAM.
    pub gpu: (String, i64, String, Vec<String>, i64),
    /// `scheduling_parameters.preemptible`.
    pub preemptible: bool,
    /// `scheduling_parameters.supervisor`.
    pub supervisor: bool,
    /// The cheapest eligible type at first sight (`None`: no eligible type).
    pub instance_type: Option<u32>,
}

impl Class {
    fn of(c: &Container, needs: &Resources, cheapest: Option<TypeId>) -> Class {
        let rc = &c.runtime_constraints;
        Class {
            vcpus: rc.vcpus,
            ram: rc.ram,
            keep_cache_ram: rc.keep_cache_ram,
            scratch: needs.scratch,
            gpu: (
                rc.gpu.stack.clone(),
                rc.gpu.device_count,
                rc.gpu.driver_version.clone(),
                rc.gpu.hardware_target.clone(),
                rc.gpu.vram,
            ),
            preemptible: c.scheduling_parameters.preemptible,
            supervisor: c.scheduling_parameters.supervisor,
            instance_type: cheapest.map(|t| t.0),
        }
    }
}

#[derive(Clone, Debug)]
struct Arrival {
    seen_at: Timestamp,
    created_at: Timestamp,
    priority: i64,
    class: Arc<Class>,
}

/// Per class while the statistics are built: arrivals, their priorities, (end, run time ms).
type ClassTally = (usize, Vec<i64>, Vec<(Timestamp, u64)>);

#[derive(Clone, Debug)]
struct Finished {
    at: Timestamp,
    runtime_ms: u64,
    class: Arc<Class>,
}

/// Recent arrivals and run times, as polls show them.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Start of the observations: the start of the first successful poll.
    since: Option<Timestamp>,
    /// Arrivals before this were dropped to stay within [`ARRIVALS_MAX`].
    dropped_until: Timestamp,
    classes: BTreeSet<Arc<Class>>,
    /// Prune the class table when it reaches this size (at least [`CLASSES_PRUNE_AT`]).
    prune_classes_at: usize,
    arrivals: VecDeque<Arrival>,
    /// Containers seen start running, with when and their class.
    running: BTreeMap<super::key::Key, (Timestamp, Arc<Class>)>,
    finished: VecDeque<Finished>,
}

impl History {
    /// A poll that started at `started` succeeded: observations start there if they have not.
    pub fn poll_started(&mut self, started: Timestamp) {
        self.since.get_or_insert(started);
    }

    /// The start of the observations (`None` before the first successful poll).
    pub fn since(&self) -> Option<Timestamp> {
        self.since
    }

    fn intern(&mut self, c: Class) -> Arc<Class> {
        if let Some(a) = self.classes.get(&c) {
            return Arc::clone(a);
        }
        if self.classes.len() >= self.prune_classes_at.max(CLASSES_PRUNE_AT) {
            self.classes.retain(|a| Arc::strong_count(a) > 1);
            self.prune_classes_at = 2 * self.classes.len();
        }
        let a = Arc::new(c);
        self.classes.insert(Arc::clone(&a));
        a
    }

    /// A container entered the queue at `now`. It counts as an arrival when it was created
    /// after the observations started; one first seen running is not timed.
    pub fn arrived(
        &mut self,
        now: Timestamp,
        c: &Container,
        needs: &Resources,
        cheapest: Option<TypeId>,
    ) {
        let Some(since) = self.since else {
            return;
        };
        if c.created_at < since || c.state != ContainerState::Queued {
            return;
        }
        let class = self.intern(Class::of(c, needs, cheapest));
        self.arrivals.push_back(Arrival {
            seen_at: now,
            created_at: c.created_at,
            priority: c.priority,
            class,
        });
        self.trim(now);
    }

    /// A poll at `now` changed a cached container from `old` to `new`.
    pub fn changed(&mut self, now: Timestamp, old: &QueueEntry, new: &Container) {
        let from = old.state();
        let to = new.state;
        if from == to {
            return;
        }
        if to == ContainerState::Running && !from.is_final() {
            let class = self.intern(Class::of(new, &old.resources, old.types.first().copied()));
            self.running.insert(new.uuid.clone(), (now, class));
        } else if to.is_final()
            && let Some((started, class)) = self.running.remove(&new.uuid)
            && to == ContainerState::Complete
        {
            self.finished.push_back(Finished {
                at: now,
                runtime_ms: now.0.saturating_sub(started.0),
                class,
            });
            self.trim(now);
        }
    }

    /// Keeps the running map within the queue's size (entries dropped without an observed
    /// end would otherwise stay).
    pub fn prune(&mut self, entries: &BTreeMap<super::key::Key, QueueEntry>) {
        if self.running.len() > 2 * entries.len() + 1024 {
            self.running.retain(|u, _| entries.contains_key(u));
        }
    }

    fn trim(&mut self, now: Timestamp) {
        let arrivals_from = now - ARRIVAL_WINDOW;
        while self
            .arrivals
            .front()
            .is_some_and(|a| a.seen_at < arrivals_from)
        {
            self.arrivals.pop_front();
        }
        while self.arrivals.len() > ARRIVALS_MAX {
            if let Some(a) = self.arrivals.pop_front() {
                self.dropped_until = self.dropped_until.max(a.seen_at);
            }
        }
        let runs_from = now - RUNTIME_WINDOW;
        while self
            .finished
            .front()
            .is_some_and(|f| f.at < runs_from || self.finished.len() > FINISHED_MAX)
        {
            self.finished.pop_front();
        }
    }
}

// ----- the snapshot -------------------------------------------------------------------------

/// A snapshot (docs/pricing.md, "What-if", describes every field).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// When it was taken: milliseconds on the dispatcher's clock (Unix time in production,
    /// virtual time in the simulator).
    pub taken_at_ms: u64,
    /// `ClusterID`.
    pub cluster_id: String,
    /// The effective config in the Arvados layout (`Clusters: {<id>: ...}`), without secrets.
    pub config: Value,
    /// The dispatcher's queue: Queued containers it sees and those it has locked.
    pub containers: Vec<SnapContainer>,
    /// The instances of its pool.
    pub instances: Vec<SnapInstance>,
    /// Creates in flight, by instance type.
    pub pending_creates: BTreeMap<String, usize>,
    /// Recent arrivals and run times.
    pub arrivals: ArrivalStats,
}

/// One container of the queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapContainer {
    /// UUID.
    pub uuid: String,
    /// Queued, Locked, Running, Complete or Cancelled (the last two until the queue forgets it).
    pub state: ContainerState,
    /// Priority.
    pub priority: i64,
    /// As the API gives them.
    pub runtime_constraints: RuntimeConstraints,
    /// As the API gives them.
    pub scheduling_parameters: SchedulingParameters,
    /// What the dispatcher reserves for it on an instance (RAM with overheads, scratch).
    pub needs: Resources,
    /// The cheapest eligible instance type ("" when none).
    pub instance_type: String,
    /// Every eligible type, cheapest first.
    pub eligible_types: Vec<String>,
    /// `created_at`, ms.
    pub created_at_ms: u64,
    /// When this dispatcher first saw it, ms.
    pub first_seen_at_ms: u64,
    /// Seconds since `created_at`.
    pub age_seconds: f64,
    /// When this dispatcher saw it start running, ms (only if it saw it before).
    pub running_since_ms: Option<u64>,
    /// The instance it runs or starts on.
    pub instance: Option<String>,
    /// The scheduling status the management API shows ("" before the first pass).
    pub scheduling_status: String,
}

/// One instance of the pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapInstance {
    /// Cloud ID.
    pub id: String,
    /// Configured type name.
    pub instance_type: String,
    /// Cloud type.
    pub provider_type: String,
    /// Hourly price.
    pub price: f64,
    /// unknown, booting, idle, running or shutdown.
    pub state: String,
    /// run, hold or drain.
    pub idle_behavior: String,
    /// When this dispatcher first saw it (its create call for instances it created), ms.
    pub appeared_at_ms: u64,
    /// Last time it had work, ms.
    pub last_busy_ms: u64,
    /// Containers running or starting on it.
    pub containers: Vec<String>,
}

/// Arrival and run-time statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArrivalStats {
    /// The window arrivals are counted over ([`ARRIVAL_WINDOW`]).
    pub window_seconds: f64,
    /// How much of it was observed: the dispatcher may have started (or restarted) later.
    pub observed_seconds: f64,
    /// Arrivals counted (created within the observed window).
    pub total: usize,
    /// `total` per observed hour.
    pub per_hour: f64,
    /// The window run times are kept over ([`RUNTIME_WINDOW`], or less if observed less).
    pub runtime_window_seconds: f64,
    /// Run times observed (containers seen start running and complete).
    pub runtimes_observed: usize,
    /// By class, most arrivals first.
    pub classes: Vec<ClassStats>,
    /// Arrivals by cheapest eligible type.
    pub by_instance_type: BTreeMap<String, TypeStats>,
}

/// Arrivals of one type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TypeStats {
    /// Arrivals.
    pub count: usize,
    /// Per observed hour.
    pub per_hour: f64,
}

/// One class: what its containers ask for, how often they arrived, how long they ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassStats {
    /// Cheapest eligible type at first sight ("" when none).
    pub instance_type: String,
    /// Constraints (`keep_cache_disk` is 0: the scratch need is in `scratch`).
    pub runtime_constraints: RuntimeConstraints,
    /// Scratch space needed, bytes.
    pub scratch: i64,
    /// `scheduling_parameters.preemptible`.
    pub preemptible: bool,
    /// `scheduling_parameters.supervisor`.
    pub supervisor: bool,
    /// Arrivals in the observed window.
    pub count: usize,
    /// Per observed hour.
    pub per_hour: f64,
    /// Median priority of the arrivals (0 when none).
    pub priority: i64,
    /// Run times of the most recent completed containers, seconds, ascending.
    pub runtime_seconds: Vec<f64>,
}

fn state_runs(s: ContainerState) -> bool {
    matches!(s, ContainerState::Running)
}

/// The snapshot of `d` at `now`.
pub fn build(d: &Dispatcher, now: Timestamp) -> Snapshot {
    let types = d.types();
    let type_name = |t: Option<u32>| {
        t.filter(|i| (*i as usize) < types.len())
            .map(|i| types.get(TypeId(i)).name.clone())
            .unwrap_or_default()
    };
    let statuses: BTreeMap<String, String> = d
        .scheduler_queue()
        .unwrap_or_default()
        .into_iter()
        .map(|q| (q.entry.container().uuid.to_string(), q.scheduling_status))
        .collect();
    let mut on_instance: BTreeMap<&str, &str> = BTreeMap::new();
    let workers = d.pool().workers();
    for w in workers.values() {
        for u in w.running.keys().chain(w.starting.keys()) {
            on_instance.insert(u, &w.id);
        }
    }
    let history = d.queue().history();
    let containers = d
        .queue()
        .entries()
        .values()
        .map(|e| {
            let c = e.container();
            SnapContainer {
                uuid: c.uuid.to_string(),
                state: c.state,
                priority: c.priority,
                runtime_constraints: c.runtime_constraints.clone(),
                scheduling_parameters: c.scheduling_parameters.clone(),
                needs: e.resources,
                instance_type: type_name(e.types.first().map(|t| t.0)),
                eligible_types: e.types.iter().map(|t| types.get(*t).name.clone()).collect(),
                created_at_ms: c.created_at.0,
                first_seen_at_ms: e.first_seen_at.0,
                age_seconds: now.0.saturating_sub(c.created_at.0) as f64 / 1000.0,
                running_since_ms: history
                    .running
                    .get(c.uuid.as_str())
                    .filter(|_| state_runs(c.state))
                    .map(|(t, _)| t.0),
                instance: on_instance.get(c.uuid.as_str()).map(|s| s.to_string()),
                scheduling_status: statuses.get(c.uuid.as_str()).cloned().unwrap_or_default(),
            }
        })
        .collect();
    let instances = workers
        .values()
        .map(|w| {
            let uuids = w.runner_uuids();
            SnapInstance {
                id: w.id.clone(),
                instance_type: w.itype.name.clone(),
                provider_type: w.info.provider_type.clone(),
                price: w.itype.price,
                state: w.state.as_str().to_string(),
                idle_behavior: w.idle_behavior.as_str().to_string(),
                appeared_at_ms: w.appeared.0,
                last_busy_ms: w.busy.0,
                containers: uuids,
            }
        })
        .collect();
    let mut pending_creates: BTreeMap<String, usize> = BTreeMap::new();
    for v in d.instances() {
        if v.instance.is_empty() {
            *pending_creates.entry(v.arvados_instance_type).or_default() += 1;
        }
    }
    Snapshot {
        format: FORMAT.into(),
        version: VERSION,
        taken_at_ms: now.0,
        cluster_id: d.config().cluster_id.clone(),
        config: arvados_config(d.config()),
        containers,
        instances,
        pending_creates,
        arrivals: arrival_stats(history, now, &type_name),
    }
}

fn arrival_stats(
    h: &History,
    now: Timestamp,
    type_name: &dyn Fn(Option<u32>) -> String,
) -> ArrivalStats {
    let since = h.since.unwrap_or(now);
    let start = since.max(h.dropped_until).max(now - ARRIVAL_WINDOW);
    let observed = now.0.saturating_sub(start.0) as f64 / 1000.0;
    let hours = observed / 3600.0;
    let rate = |n: usize| if hours > 0.0 { n as f64 / hours } else { 0.0 };
    let mut by_class: BTreeMap<&Arc<Class>, ClassTally> = BTreeMap::new();
    let mut total = 0;
    for a in h
        .arrivals
        .iter()
        .filter(|a| a.created_at >= start && a.created_at <= now)
    {
        let e = by_class.entry(&a.class).or_default();
        e.0 += 1;
        e.1.push(a.priority);
        total += 1;
    }
    let runs_from = now - RUNTIME_WINDOW;
    let mut runtimes = 0;
    for f in h
        .finished
        .iter()
        .filter(|f| f.at >= runs_from && f.at <= now)
    {
        by_class
            .entry(&f.class)
            .or_default()
            .2
            .push((f.at, f.runtime_ms));
        runtimes += 1;
    }
    let mut by_instance_type: BTreeMap<String, TypeStats> = BTreeMap::new();
    let mut classes: Vec<ClassStats> = by_class
        .into_iter()
        .map(|(class, (count, mut priorities, mut runs))| {
            priorities.sort_unstable();
            // Most recent first, then the latest SAMPLES_PER_CLASS_MAX, listed ascending.
            runs.sort_by(|a, b| b.cmp(a));
            runs.truncate(SAMPLES_PER_CLASS_MAX);
            let mut runtime_seconds: Vec<f64> =
                runs.iter().map(|(_, ms)| *ms as f64 / 1000.0).collect();
            runtime_seconds.sort_by(f64::total_cmp);
            let instance_type = type_name(class.instance_type);
            if count > 0 {
                let t = by_instance_type
                    .entry(instance_type.clone())
                    .or_insert(TypeStats {
                        count: 0,
                        per_hour: 0.0,
                    });
                t.count += count;
                t.per_hour = rate(t.count);
            }
            let (stack, device_count, driver_version, hardware_target, vram) = class.gpu.clone();
            ClassStats {
                instance_type,
                runtime_constraints: RuntimeConstraints {
                    vcpus: class.vcpus,
                    ram: class.ram,
                    keep_cache_ram: class.keep_cache_ram,
                    keep_cache_disk: 0,
                    gpu: GpuRequest {
                        stack,
                        device_count,
                        driver_version,
                        hardware_target,
                        vram,
                    },
                    api: false,
                },
                scratch: class.scratch,
                preemptible: class.preemptible,
                supervisor: class.supervisor,
                count,
                per_hour: rate(count),
                priority: priorities.get(priorities.len() / 2).copied().unwrap_or(0),
                runtime_seconds,
            }
        })
        .collect();
    // Most arrivals first; the class key (already the map's order) breaks ties.
    classes.sort_by_key(|c| std::cmp::Reverse(c.count));
    ArrivalStats {
        window_seconds: ARRIVAL_WINDOW.as_secs_f64(),
        observed_seconds: observed,
        total,
        per_hour: rate(total),
        runtime_window_seconds: (now.0.saturating_sub(since.max(runs_from).0)) as f64 / 1000.0,
        runtimes_observed: runtimes,
        classes,
        by_instance_type,
    }
}

// ----- the config in the Arvados layout -----------------------------------------------------

/// A duration as Go writes one that parses back exactly: whole seconds, milliseconds or
/// nanoseconds.
pub fn go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", ns / 1_000_000_000)
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", ns / 1_000_000)
    } else {
        format!("{ns}ns")
    }
}

/// Whether `t` is the variant the loader adds for `PreemptiblePriceFactor` (so that it is left
/// out of the rendered config and comes back from the factor, or goes when the factor changes).
fn automatic_variant(c: &Config, t: &InstanceType) -> bool {
    let f = c.containers.preemptible_price_factor;
    if f <= 0.0 || !t.preemptible {
        return false;
    }
    let Some(base) = t
        .name
        .strip_suffix(".preemptible")
        .and_then(|b| c.instance_types.get(b))
    else {
        return false;
    };
    let variant = InstanceType {
        name: t.name.clone(),
        preemptible: true,
        price: base.price * f,
        // The loader assigns quota groups after adding the variants.
        quota_group: t.quota_group.clone(),
        ..base.clone()
    };
    !base.preemptible && variant == *t
}

/// The effective config the core runs on, in the Arvados layout (`Clusters: {<id>: ...}`), so
/// that the dispatcher's own loader reads it back into the same [`Config`] (tuning aside, which
/// has no Arvados key). It holds no secret: the core never has one. Keys the core does not use
/// (Services, tokens, keys, DriverParameters other than the EC2 quota groups) are left out;
/// preemptible variants that
/// `PreemptiblePriceFactor` adds are left out too, since the loader adds them back.
pub fn arvados_config(c: &Config) -> Value {
    let d = go_duration;
    let k = &c.containers;
    let v = &c.cloud_vms;
    let mut types = Map::new();
    for t in c.instance_types.values() {
        if automatic_variant(c, t) {
            continue;
        }
        let mut m = Map::new();
        m.insert("ProviderType".into(), json!(t.provider_type));
        m.insert("VCPUs".into(), json!(t.vcpus));
        m.insert("RAM".into(), json!(t.ram));
        m.insert("IncludedScratch".into(), json!(t.included_scratch));
        m.insert("AddedScratch".into(), json!(t.added_scratch));
        m.insert("Price".into(), json!(t.price));
        m.insert("Preemptible".into(), json!(t.preemptible));
        if t.gpu.device_count > 0 || !t.gpu.stack.is_empty() {
            m.insert(
                "GPU".into(),
                json!({
                    "Stack": t.gpu.stack,
                    "DriverVersion": t.gpu.driver_version,
                    "HardwareTarget": t.gpu.hardware_target,
                    "DeviceCount": t.gpu.device_count,
                    "VRAM": t.gpu.vram,
                }),
            );
        }
        types.insert(t.name.clone(), Value::Object(m));
    }
    let cluster = json!({
        "Containers": {
            "MaxDispatchAttempts": k.max_dispatch_attempts,
            "StaleLockTimeout": d(k.stale_lock_timeout),
            "ReserveExtraRAM": k.reserve_extra_ram,
            "LocalKeepBlobBuffersPerVCPU": k.local_keep_blob_buffers_per_vcpu,
            "MaximumPriceFactor": k.maximum_price_factor,
            "PreemptiblePriceFactor": k.preemptible_price_factor,
            "CrunchRunCommand": k.crunch_run_command,
            "CrunchRunArgumentsList": k.crunch_run_arguments_list,
            "RuntimeEngine": k.runtime_engine,
            "CloudVMs": {
                "Driver": v.driver,
                "PollInterval": d(v.poll_interval),
                "MaxInstances": v.max_instances,
                "InitialQuotaEstimate": v.initial_quota_estimate,
                "SupervisorFraction": v.supervisor_fraction,
                "MaxRunningContainersPerInstance": v.max_running_containers_per_instance,
                "MaxCloudOpsPerSecond": v.max_cloud_ops_per_second,
                "MaxConcurrentInstanceCreateOps": v.max_concurrent_instance_create_ops,
                "SyncInterval": d(v.sync_interval),
                "ProbeInterval": d(v.probe_interval),
                "MaxProbesPerSecond": v.max_probes_per_second,
                "BootProbeCommand": v.boot_probe_command,
                "TimeoutIdle": d(v.timeout_idle),
                "TimeoutBooting": d(v.timeout_booting),
                "TimeoutProbe": d(v.timeout_probe),
                "TimeoutShutdown": d(v.timeout_shutdown),
                "TimeoutSignal": d(v.timeout_signal),
                "TimeoutTERM": d(v.timeout_term),
                "TimeoutStaleRunLock": d(v.timeout_stale_run_lock),
                "SSHPort": v.ssh_port,
                "ImageID": v.image_id,
                "InstanceInitCommand": v.instance_init_command,
                "DeployRunnerBinary": v.deploy_runner_binary,
                "DeployRunnerDirectory": v.deploy_runner_directory,
                "DeployPublicKey": v.deploy_public_key,
                "ResourceTags": v.resource_tags,
                "TagKeyPrefix": v.tag_key_prefix,
            },
        },
        "InstanceTypes": Value::Object(types),
    });
    let mut cluster = cluster;
    if v.driver == "ec2" {
        // The types' quota groups, as the one DriverParameters key that is not a credential:
        // each keyed by its provider type without the last character, the longest prefix the
        // loader looks up, so that it wins over the shipped map.
        let mut groups = Map::new();
        for t in c.instance_types.values() {
            let pt = t.provider_type.to_lowercase();
            let alpha = pt.find(|ch: char| !ch.is_ascii_lowercase());
            let last = pt.char_indices().last().map(|(i, _)| i);
            if let (Some(alpha), Some(last)) = (alpha, last)
                && last >= alpha
            {
                let group = t
                    .quota_group
                    .strip_suffix("-spot")
                    .unwrap_or(&t.quota_group);
                groups.insert(pt[..last].to_string(), json!(group));
            }
        }
        cluster["Containers"]["CloudVMs"]["DriverParameters"] =
            json!({ "InstanceTypeQuotaGroups": groups });
    }
    let mut clusters = Map::new();
    clusters.insert(c.cluster_id.clone(), cluster);
    json!({ "Clusters": Value::Object(clusters) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::command::PollResult;
    use crate::core::queue::Queue;
    use crate::core::select::TypeTable;

    const CONFIG: &str = r#"
Clusters:
  zzzzz:
    SystemRootToken: xyzzyxyzzyxyzzyxyzzyxyzzyxyzzyxyzzyxyzzy
    ManagementToken: managementmanagementmanagementmanagement
    Containers:
      DispatchPrivateKey: "-----BEGIN OPENSSH PRIVATE KEY-----\nsecretkeymaterial\n-----END OPENSSH PRIVATE KEY-----\n"
      PreemptiblePriceFactor: 0.3
      MaximumPriceFactor: 1.25
      ReserveExtraRAM: 1GiB
      CloudVMs:
        Driver: ec2
        TimeoutIdle: 1m30s
        PollInterval: 1500ms
        MaxInstances: 17
        ResourceTags: {team: genomics}
        DriverParameters:
          Region: us-east-1
          AccessKeyID: AKIAEXAMPLEEXAMPLE
          SecretAccessKey: verysecretaccesskeyvalue
    InstanceTypes:
      m5.large: {VCPUs: 2, RAM: 8GiB, IncludedScratch: 32GB, Price: 0.096}
      g5.xlarge:
        VCPUs: 4
        RAM: 16GiB
        AddedScratch: 100GB
        Price: 1.006
        GPU: {Stack: cuda, DriverVersion: "12.0", HardwareTarget: "8.6", DeviceCount: 1, VRAM: 24GiB}
      c5.spot: {ProviderType: c5.large, VCPUs: 2, RAM: 4GiB, Price: 0.03, Preemptible: true}
"#;

    #[test]
    fn go_durations_parse_back() {
        assert_eq!(go_duration(Duration::from_secs(90)), "90s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go_duration(Duration::from_nanos(7)), "7ns");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn rendered_config_loads_back_the_same_and_holds_no_secret() {
        let loaded = crate::config::load_str(CONFIG, "test").expect("loads");
        let rendered = arvados_config(&loaded.core);
        let text = rendered.to_string();
        for secret in [
            "xyzzyxyzzy",
            "managementmanagement",
            "secretkeymaterial",
            "AKIAEXAMPLE",
            "verysecretaccesskey",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        // The automatic variants are left out; the configured preemptible type stays.
        let types = &rendered["Clusters"]["zzzzz"]["InstanceTypes"];
        assert!(types.get("m5.large.preemptible").is_none(), "{types}");
        assert!(types.get("c5.spot").is_some(), "{types}");
        let again = crate::config::load_str(&text, "rendered").expect("loads back");
        assert_eq!(again.core, loaded.core);
        assert!(
            again
                .core
                .instance_types
                .contains_key("m5.large.preemptible")
        );
    }

    fn container(uuid: &str, state: ContainerState, created: u64) -> Arc<Container> {
        let mut c = Container {
            uuid: uuid.into(),
            state,
            priority: 10,
            created_at: Timestamp(created),
            mounts: Some(BTreeMap::new()),
            ..Container::default()
        };
        c.runtime_constraints.vcpus = 1;
        c.runtime_constraints.ram = 1 << 30;
        Arc::new(c)
    }

    fn poll(q: &mut Queue, t: &TypeTable, cfg: &Config, now: u64, cs: Vec<Arc<Container>>) {
        q.begin_poll(Timestamp(now));
        q.apply_poll(
            Timestamp(now),
            PollResult {
                containers: cs,
                ..PollResult::default()
            },
            t,
            &cfg.containers,
            1000,
        );
    }

    #[test]
    fn the_class_table_keeps_only_classes_in_use() {
        let mut h = History::default();
        h.poll_started(Timestamp(0));
        for i in 0..20_000u64 {
            // A distinct request every second: an hour's worth stays in the window.
            let mut c = (*container("zzzzz-dz642-x", ContainerState::Queued, i * 1000)).clone();
            c.runtime_constraints.ram = 1_000_000 + i as i64;
            h.arrived(Timestamp(i * 1000), &c, &Resources::default(), None);
            assert!(
                h.classes.len() <= 2 * 3602 + 1,
                "{} classes",
                h.classes.len()
            );
        }
        assert_eq!(h.arrivals.len(), 3601);
    }

    #[test]
    fn history_counts_new_arrivals_and_times_observed_runs() {
        let loaded = crate::config::load_str(CONFIG, "test").expect("loads");
        let cfg = loaded.core;
        let table = TypeTable::new(&cfg.instance_types);
        let mut q = Queue::default();
        let h0 = 1_000_000;
        // At the first poll, "old" existed before the observations began: not an arrival.
        poll(
            &mut q,
            &table,
            &cfg,
            h0,
            vec![container(
                "zzzzz-dz642-old000000000000",
                ContainerState::Queued,
                5,
            )],
        );
        let new = |s| container("zzzzz-dz642-new000000000000", s, h0 + 10_000);
        let old = |s| container("zzzzz-dz642-old000000000000", s, 5);
        poll(
            &mut q,
            &table,
            &cfg,
            h0 + 20_000,
            vec![old(ContainerState::Queued), new(ContainerState::Queued)],
        );
        poll(
            &mut q,
            &table,
            &cfg,
            h0 + 30_000,
            vec![old(ContainerState::Running), new(ContainerState::Running)],
        );
        poll(
            &mut q,
            &table,
            &cfg,
            h0 + 630_000,
            vec![old(ContainerState::Complete), new(ContainerState::Running)],
        );
        let stats = arrival_stats(q.history(), Timestamp(h0 + 3_600_000), &|_| "t".to_string());
        assert_eq!(stats.total, 1);
        assert_eq!(stats.observed_seconds, 3600.0);
        assert_eq!(stats.runtimes_observed, 1);
        let ran: Vec<f64> = stats
            .classes
            .iter()
            .flat_map(|c| c.runtime_seconds.clone())
            .collect();
        assert_eq!(ran, vec![600.0]);
        assert_eq!(stats.classes[0].count, 1);
        assert_eq!(stats.classes[0].per_hour, 1.0);
    }
}
