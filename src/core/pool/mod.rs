//! The worker pool: every VM, its probes, its runners, and the cloud-side limits.
//!
//! This is Go's `worker.Pool` (reference-workers.md §1–4) as a synchronous state machine. The
//! goroutines and timers of the original become commands and deadlines: probes are paced at
//! `MaxProbesPerSecond`, cloud calls (create, destroy, list, set tags) share one
//! `MaxCloudOpsPerSecond` limiter, creates are bounded by `MaxConcurrentInstanceCreateOps`, and
//! the quota, capacity and rate-limit memories expire at fixed times that `next_timeout` reports.
//!
//! Invariants (checked by `check_invariants`): the runner index maps exactly the UUIDs in the
//! workers' `running` and `starting` maps, each to the worker that holds it (its ID and slot);
//! `Running()` is the runner index and the exit placeholders, which are disjoint; a worker in
//! `shutdown` has no runner in `starting`; a worker with a probe in progress has that probe's
//! operation in flight.

pub mod remote;
pub mod worker;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::command::{
    CapacityScope, CloudError, CloudErrorKind, CommandKind, ExecError, ExecOutput, ExecPurpose,
    ExecStdin, OpId,
};
use super::config::Config;
use super::fastcmp::{str_cmp, str_eq};
use super::key::Key;
use super::metrics::{BootOutcome, PoolMetrics};
use super::ops::{Ops, Pending};
use super::price;
use super::rng::Rng;
use super::scheduler::{Indexed, PlanInstance, RunnerAt};
use super::select::{TypeId, TypeTable};
use super::time::Timestamp;
use super::types::{
    Container, IdleBehavior, InstanceInfo, InstanceType, InstanceView, WorkerState,
};
use remote::RunnerSpec;
use worker::{ListProbe, Probe, ProbeStep, Runner, RunnerMap, Worker};

/// How long a quota error with no instances, and a capacity error, are remembered.
pub const QUOTA_ERROR_TTL: Duration = Duration::from_secs(60);
/// Capacity error memory.
pub const CAPACITY_ERROR_TTL: Duration = Duration::from_secs(60);
/// Create holdoff after hitting MaxConcurrentInstanceCreateOps.
pub const CREATE_CONCURRENCY_HOLDOFF: Duration = Duration::from_secs(5);
/// Most queued cloud calls; beyond it, re-requests (tags, destroy retries) wait for a later sync.
pub const CLOUD_QUEUE_MAX: usize = 100_000;
/// Up to this many UUIDs in one `--list` report are searched in place; more are sorted first.
const FEW_REPORTED: usize = 8;

/// Why an admin operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// `SetIdleBehavior` on an unknown ID.
    #[error("requested instance does not exist")]
    NoSuchInstance,
    /// `KillInstance` on an unknown ID.
    #[error("instance not found")]
    InstanceNotFound,
    /// `KillContainer` on a UUID with no runner.
    #[error("container not found")]
    ContainerNotFound,
}

/// A finished remote command, as the pool needs it.
#[derive(Clone, Debug)]
pub struct ExecDone {
    /// The command's id.
    pub op: OpId,
    /// When it was issued (for the run-probe duration metric).
    pub issued: Timestamp,
    /// Cloud ID.
    pub instance: String,
    /// What it was for.
    pub purpose: ExecPurpose,
    /// How it ended.
    pub result: Result<ExecOutput, ExecError>,
}

/// A cloud call waiting for the rate limiter.
#[derive(Clone, Debug, PartialEq, Eq)]
enum CloudReq {
    Create(String),
    Destroy(String),
    List,
    SetTags(String),
}

#[derive(Clone, Debug, PartialEq)]
struct Creating {
    type_id: TypeId,
    started: Timestamp,
}

/// One instance as a scheduling pass reads it: a reference to a worker, or a pending create.
#[derive(Clone, Copy, Debug)]
pub enum PoolInstance<'a> {
    /// A worker, with its key in the pool's map (the ID, kept in the map's node: a pass
    /// reads every ID, and the worker's own copy is a separate heap block).
    Worker(&'a Key, &'a Worker),
    /// A create in flight, of this type.
    Creating(&'a InstanceType),
}

impl PlanInstance for PoolInstance<'_> {
    fn id(&self) -> &str {
        match self {
            PoolInstance::Worker(id, _) => id.as_str(),
            PoolInstance::Creating(_) => "",
        }
    }
    fn type_name(&self) -> &str {
        match self {
            PoolInstance::Worker(_, w) => &w.itype.name,
            PoolInstance::Creating(t) => &t.name,
        }
    }
    fn price(&self) -> f64 {
        match self {
            PoolInstance::Worker(_, w) => w.itype.price,
            PoolInstance::Creating(t) => t.price,
        }
    }
    fn type_and_price(&self, types: &TypeTable) -> (Option<TypeId>, f64) {
        match self {
            // A configured type's record is the table's (`Pool::appeared`).
            PoolInstance::Worker(_, w) => match w.type_id {
                Some(t) => (Some(t), types.get(t).price),
                None => (None, w.itype.price),
            },
            PoolInstance::Creating(t) => (types.id(&t.name), t.price),
        }
    }
    fn running_uuids(&self) -> impl Iterator<Item = &str> {
        let w = match self {
            PoolInstance::Worker(_, w) => Some(*w),
            PoolInstance::Creating(_) => None,
        };
        w.into_iter()
            .flat_map(|w| w.running.keys().chain(w.starting.keys()).map(Key::as_str))
    }
    fn running_count(&self) -> usize {
        match self {
            PoolInstance::Worker(_, w) => w.runner_count(),
            PoolInstance::Creating(_) => 0,
        }
    }
    fn state(&self) -> WorkerState {
        match self {
            PoolInstance::Worker(_, w) => w.state,
            PoolInstance::Creating(_) => WorkerState::Booting,
        }
    }
    fn idle_behavior(&self) -> IdleBehavior {
        match self {
            PoolInstance::Worker(_, w) => w.idle_behavior,
            PoolInstance::Creating(_) => IdleBehavior::Run,
        }
    }
    fn slot(&self) -> Option<u32> {
        match self {
            PoolInstance::Worker(_, w) => Some(w.slot),
            PoolInstance::Creating(_) => None,
        }
    }
}

/// Which container runs where, and `Running()` kept in step with it.
#[derive(Debug, Default)]
struct RunnerBook {
    /// Container → the worker holding its runner (starting or running): its ID and slot.
    index: BTreeMap<Key, RunnerAt>,
    /// Exit placeholders: container → when its crunch-run was seen to exit.
    exited: BTreeMap<Key, Timestamp>,
    /// `Running()`: the union of the two (they are disjoint).
    map: BTreeMap<Key, Option<Timestamp>>,
}

impl RunnerBook {
    /// The ID of the worker holding `uuid`'s runner, if any.
    fn holder(&self, uuid: &str) -> Option<&Key> {
        self.index.get(&Key::new(uuid)).map(|at| &at.id)
    }

    fn started(&mut self, uuid: &str, id: &str, slot: u32) {
        let uuid = Key::new(uuid);
        self.index.insert(
            uuid.clone(),
            RunnerAt {
                id: Key::new(id),
                slot,
            },
        );
        self.exited.remove(&uuid);
        self.map.insert(uuid, None);
    }

    fn dropped(&mut self, uuid: &str) {
        let uuid = Key::new(uuid);
        self.index.remove(&uuid);
        match self.exited.get(&uuid) {
            Some(t) => self.map.insert(uuid, Some(*t)),
            None => self.map.remove(&uuid),
        };
    }

    fn exited_at(&mut self, uuid: &str, now: Timestamp) {
        let uuid = Key::new(uuid);
        self.index.remove(&uuid);
        self.exited.insert(uuid.clone(), now);
        self.map.insert(uuid, Some(now));
    }

    fn unexit(&mut self, uuid: &str) {
        let uuid = Key::new(uuid);
        if self.exited.remove(&uuid).is_some() && !self.index.contains_key(&uuid) {
            self.map.remove(&uuid);
        }
    }
}

/// Tag keys with the configured prefix.
#[derive(Debug)]
struct TagKeys {
    instance_type: String,
    idle_behavior: String,
    instance_set_id: String,
}

impl TagKeys {
    /// `desired_tags(w) == w.info.tags` without building the map: the desired tags are the
    /// listed ones with two keys set, so they are equal exactly when both keys already hold
    /// the desired values.
    fn current(&self, w: &mut Worker) -> bool {
        if let Some((info, behavior)) = &w.tags_current_for
            && Arc::ptr_eq(info, &w.info)
            && *behavior == w.idle_behavior
        {
            return true;
        }
        let current = w.info.tags.get(&self.instance_type) == Some(&w.itype.name)
            && w.info.tags.get(&self.idle_behavior).map(String::as_str)
                == Some(w.idle_behavior.as_str());
        w.tags_current_for = current.then(|| (Arc::clone(&w.info), w.idle_behavior));
        current
    }
}

/// The pool.
#[derive(Debug)]
pub struct Pool {
    cfg: Arc<Config>,
    tag_keys: TagKeys,
    types: TypeTable,
    runner: RunnerSpec,
    /// The run probe's command (`crunch-run --list`), without and with `sudo`: the same for
    /// every probe of a remote user, so formatted once.
    list_commands: [String; 2],
    instance_set_id: String,
    workers: BTreeMap<Key, Worker>,
    slots: Slots,
    creating: BTreeMap<String, Creating>,
    book: RunnerBook,
    stamp: u64,
    loaded: bool,
    quota_until_fewer: usize,
    quota_until: Option<Timestamp>,
    capacity: BTreeMap<String, Timestamp>,
    create_throttle: Option<Timestamp>,
    list_throttle: Option<Timestamp>,
    cloud_queue: VecDeque<CloudReq>,
    cloud_next_at: Timestamp,
    list_busy: bool,
    next_sync_at: Timestamp,
    next_probe_tick: Timestamp,
    probe_round_at: Option<Timestamp>,
    probe_queue: VecDeque<Key>,
    probe_next_launch: Timestamp,
    kill_timers: BTreeSet<(Timestamp, String)>,
    changed: bool,
    /// Counters and summaries.
    pub metrics: PoolMetrics,
}

/// A hash of the runner (`uuid`, `id`, `slot`) for [`Pool::workers_consistent`]'s multiset
/// sums: each 8-byte word, then the lengths, then the slot, folded in through a
/// multiply-xorshift mixer (MurmurHash3's finaliser), so that distinct runners' hashes look
/// independent.
fn pair_hash(uuid: &str, id: &str, slot: u32) -> u64 {
    fn mix(mut x: u64) -> u64 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
    fn fold(mut h: u64, s: &str) -> u64 {
        let mut words = s.as_bytes().chunks_exact(8);
        for w in &mut words {
            h = mix(h ^ u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
        }
        let tail = words
            .remainder()
            .iter()
            .enumerate()
            .fold(0u64, |t, (i, b)| t | u64::from(*b) << (8 * i));
        mix(h ^ tail ^ (s.len() as u64) << 56)
    }
    mix(fold(fold(0x9e37_79b9_7f4a_7c15, uuid), id) ^ u64::from(slot))
}

/// The workers' slots ([`Worker::slot`]): a freed slot is handed out again before a new one,
/// so they stay below the most workers the pool has held at once.
#[derive(Debug, Default)]
struct Slots {
    next: u32,
    free: Vec<u32>,
}

impl Slots {
    fn take(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn give(&mut self, slot: u32) {
        self.free.push(slot);
    }
}

/// Where [`Pool::listed_merge`] goes on in the worker map.
enum Resume {
    /// From the first worker.
    Start,
    /// From this ID.
    At(Key),
    /// Past the last worker.
    End,
}

/// What [`Pool::listed`] refreshes each worker with.
struct Listing {
    now: Timestamp,
    /// The pool's stamp before the listing: a worker stamped above it was refreshed already.
    first: u64,
    shutdown_timeout: Duration,
}

/// Whether a listed record belongs to this dispatcher's instance set. Drivers may ignore the
/// tag filter, so it is applied here; a record the worker already holds (the same listing as
/// last time) passed it then.
fn of_this_set(
    held: Option<&Worker>,
    info: &Arc<InstanceInfo>,
    tag_keys: &TagKeys,
    instance_set_id: &String,
) -> bool {
    held.is_some_and(|w| Arc::ptr_eq(&w.info, info))
        || info.tags.get(&tag_keys.instance_set_id) == Some(instance_set_id)
}

/// A listed record for the known worker `w` (`update_worker` for a known instance, without
/// cloning its ID): a shared record the worker already holds (the same listing as last time)
/// is kept. Returns the cloud call the worker needs: its tags set, or its destroy retried.
/// Skips a worker this listing already refreshed.
fn refresh_listed(
    w: &mut Worker,
    info: Arc<InstanceInfo>,
    listing: &Listing,
    stamp: &mut u64,
    tag_keys: &TagKeys,
) -> Option<CloudReq> {
    let Listing {
        now,
        first,
        shutdown_timeout,
    } = *listing;
    if w.seen > first {
        return None;
    }
    *stamp += 1;
    w.seen = *stamp;
    if !Arc::ptr_eq(&w.info, &info) {
        w.set_info(info);
    }
    let shutdown = w.state == WorkerState::Shutdown;
    if !shutdown && !w.tags_busy && !tag_keys.current(w) {
        w.tags_busy = true;
        return Some(CloudReq::SetTags(w.id.clone()));
    }
    if shutdown && w.destroyed.is_some_and(|d| now.since(d) > shutdown_timeout) {
        w.destroyed = Some(now);
        tracing::info!(instance = %w.id, "instance still listed after shutdown; retrying destroy");
        return Some(CloudReq::Destroy(w.id.clone()));
    }
    None
}

/// The operation `w`'s probe waits for, when it is not in flight (inconsistent).
fn lost_probe(w: &Worker, ops: &Ops) -> Option<OpId> {
    w.probe
        .as_ref()
        .map(|p| p.op)
        .filter(|op| !ops.contains(*op))
}

fn nonzero(d: Duration, fallback: Duration) -> Duration {
    if d.is_zero() { fallback } else { d }
}

fn per_second(rate: f64, fallback: f64) -> Duration {
    let r = if rate > 0.0 { rate } else { fallback };
    Duration::from_secs_f64(1.0 / r)
}

impl Pool {
    /// An empty pool. The first sync runs at `now`.
    pub fn new(
        cfg: Arc<Config>,
        types: TypeTable,
        runner: RunnerSpec,
        instance_set_id: &str,
        now: Timestamp,
    ) -> Pool {
        Pool {
            tag_keys: Pool::tag_keys(&cfg),
            cfg,
            types,
            list_commands: [
                remote::list_command(&runner.command, "root"),
                remote::list_command(&runner.command, ""),
            ],
            runner,
            instance_set_id: instance_set_id.to_string(),
            workers: BTreeMap::new(),
            slots: Slots::default(),
            creating: BTreeMap::new(),
            book: RunnerBook::default(),
            stamp: 0,
            loaded: false,
            quota_until_fewer: 0,
            quota_until: None,
            capacity: BTreeMap::new(),
            create_throttle: None,
            list_throttle: None,
            cloud_queue: VecDeque::new(),
            cloud_next_at: now,
            list_busy: false,
            next_sync_at: now,
            next_probe_tick: now,
            probe_round_at: None,
            probe_queue: VecDeque::new(),
            probe_next_launch: now,
            kill_timers: BTreeSet::new(),
            changed: false,
            metrics: PoolMetrics::default(),
        }
    }

    // ----- durations ------------------------------------------------------------------------

    fn timeout_booting(&self) -> Duration {
        nonzero(self.cfg.cloud_vms.timeout_booting, Duration::from_secs(600))
    }
    fn timeout_probe(&self) -> Duration {
        nonzero(self.cfg.cloud_vms.timeout_probe, Duration::from_secs(600))
    }
    fn timeout_idle(&self) -> Duration {
        nonzero(self.cfg.cloud_vms.timeout_idle, Duration::from_secs(60))
    }
    fn timeout_shutdown(&self) -> Duration {
        nonzero(self.cfg.cloud_vms.timeout_shutdown, Duration::from_secs(10))
    }
    fn timeout_signal(&self) -> Duration {
        nonzero(self.cfg.cloud_vms.timeout_signal, Duration::from_secs(5))
    }
    fn timeout_term(&self) -> Duration {
        nonzero(self.cfg.cloud_vms.timeout_term, Duration::from_secs(120))
    }
    fn timeout_stale_run_lock(&self) -> Duration {
        nonzero(
            self.cfg.cloud_vms.timeout_stale_run_lock,
            Duration::from_secs(5),
        )
    }
    fn sync_interval(&self) -> Duration {
        nonzero(self.cfg.cloud_vms.sync_interval, Duration::from_secs(60))
    }
    fn probe_interval(&self) -> Duration {
        nonzero(self.cfg.cloud_vms.probe_interval, Duration::from_secs(10))
    }
    /// The prefixed tag keys, computed once: a listing reads them for every instance.
    fn tag_keys(cfg: &Config) -> TagKeys {
        let tag = |key: &str| format!("{}{key}", cfg.cloud_vms.tag_key_prefix);
        TagKeys {
            instance_type: tag("InstanceType"),
            idle_behavior: tag("IdleBehavior"),
            instance_set_id: tag("InstanceSetID"),
        }
    }

    fn tag(&self, key: &str) -> String {
        format!("{}{key}", self.cfg.cloud_vms.tag_key_prefix)
    }

    // ----- queries --------------------------------------------------------------------------

    /// The pool's current generation stamp: a list issued now carries it as its threshold, and
    /// workers not seen since then disappear when the list returns.
    pub fn stamp(&self) -> u64 {
        self.stamp
    }

    /// Whether the first cloud listing has loaded.
    pub fn loaded(&self) -> bool {
        self.loaded
    }

    /// Takes the "something changed" flag (Go's notify).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The runner the pool deploys.
    pub fn runner(&self) -> &RunnerSpec {
        &self.runner
    }

    /// The workers, by ID.
    pub fn workers(&self) -> &BTreeMap<Key, Worker> {
        &self.workers
    }

    /// Number of creates in flight.
    pub fn creating_count(&self) -> usize {
        self.creating.len()
    }

    /// Workers plus creates in flight.
    pub fn instance_count(&self) -> usize {
        self.workers.len() + self.creating.len()
    }

    /// The quota-error part of `AtQuota` (ignoring MaxInstances).
    pub fn quota_error_active(&self, now: Timestamp) -> bool {
        self.quota_until_fewer > 0 || self.quota_until.is_some_and(|t| now < t)
    }

    /// `AtQuota()`.
    pub fn at_quota(&self, now: Timestamp) -> bool {
        let max = self.cfg.cloud_vms.max_instances;
        self.quota_error_active(now) || (max > 0 && self.instance_count() >= max)
    }

    /// The capacity keys blocked at `now`.
    pub fn capacity_blocked(&self, now: Timestamp) -> BTreeSet<String> {
        self.capacity
            .iter()
            .filter(|(_, t)| now < **t)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// `AtCapacity(type)`.
    pub fn at_capacity(&self, it: &InstanceType, now: Timestamp) -> bool {
        let blocked = |k: &str| self.capacity.get(k).is_some_and(|t| now < *t);
        blocked("") || blocked(&it.quota_group) || blocked(&it.capacity_key())
    }

    /// Whether `Create` would refuse because of the runner or a throttle (not capacity, quota
    /// or the concurrency limit).
    pub fn create_blocked(&self, now: Timestamp) -> bool {
        self.runner.load_error.is_some() || self.create_throttle.is_some_and(|t| now < t)
    }

    /// Whether any worker is `unknown`.
    pub fn any_unknown(&self) -> bool {
        self.workers
            .values()
            .any(|w| w.state == WorkerState::Unknown)
    }

    /// `Running()`: every UUID with a runner (`None`) or an exit placeholder (`Some(exit)`).
    /// Maintained as runners come and go, so reading it costs nothing.
    pub fn running(&self) -> &BTreeMap<Key, Option<Timestamp>> {
        &self.book.map
    }

    /// One entry of `Running()`: `Some(None)` while a runner exists, `Some(Some(exit))` for an
    /// exit placeholder, `None` otherwise.
    pub fn running_get(&self, uuid: &str) -> Option<Option<Timestamp>> {
        self.book.map.get(&Key::new(uuid)).copied()
    }

    /// The UUIDs of `Running()`, in order.
    pub fn running_uuids(&self) -> impl Iterator<Item = &Key> + '_ {
        self.book.map.keys()
    }

    /// What a scheduling pass reads instead of every worker's runners and of `Running()`:
    /// every runner (starting or running) by container UUID, with the instance holding it;
    /// the exit placeholders; and the pool's word that [`Pool::plan_instances`] lists the
    /// instances in order.
    pub fn indexed(&self) -> Indexed<'_> {
        Indexed {
            runners: &self.book.index,
            exited: &self.book.exited,
            instances_sorted: true,
        }
    }

    /// Whether a runner (starting or running) exists for `uuid`.
    pub fn has_runner(&self, uuid: &str) -> bool {
        self.book.index.contains_key(&Key::new(uuid))
    }

    /// `Instances()`: workers and pending creates, sorted by ID, then type name.
    pub fn instances(&self) -> Vec<InstanceView> {
        self.views(Worker::view)
    }

    /// `Instances()` as a scheduling pass reads it: references to the workers, nothing copied.
    pub fn plan_instances(&self) -> Vec<PoolInstance<'_>> {
        // The order of `views`: pending creates (the empty ID) first, by type name, stable;
        // then workers by ID (the map's order).
        let mut v: Vec<PoolInstance<'_>> =
            Vec::with_capacity(self.workers.len() + self.creating.len());
        v.extend(
            self.creating
                .values()
                .map(|c| PoolInstance::Creating(self.types.get(c.type_id))),
        );
        v.sort_by(|a, b| a.type_name().cmp(b.type_name()));
        v.extend(
            self.workers
                .iter()
                .map(|(id, w)| PoolInstance::Worker(id, w)),
        );
        v
    }

    fn views(&self, view: fn(&Worker) -> InstanceView) -> Vec<InstanceView> {
        let mut v: Vec<InstanceView> = Vec::with_capacity(self.workers.len() + self.creating.len());
        v.extend(self.workers.values().map(view));
        for c in self.creating.values() {
            let it = self.types.get(c.type_id);
            v.push(InstanceView {
                instance: String::new(),
                address: String::new(),
                price: it.price,
                arvados_instance_type: it.name.clone(),
                provider_instance_type: it.provider_type.clone(),
                last_container_uuid: String::new(),
                last_busy: Timestamp::ZERO,
                running_container_uuids: None,
                worker_state: WorkerState::Booting,
                idle_behavior: IdleBehavior::Run,
            });
        }
        // Pending creates share the empty ID; the type name breaks ties (as Go), and the sort
        // is stable, so equal rows keep their (deterministic) insertion order.
        v.sort_by(|a, b| {
            a.instance
                .cmp(&b.instance)
                .then_with(|| a.arvados_instance_type.cmp(&b.arvados_instance_type))
        });
        v
    }

    // ----- scheduler-facing operations ------------------------------------------------------

    /// `Create(type)`: starts an asynchronous create, or refuses (reference-workers.md §1.7).
    pub fn create(&mut self, now: Timestamp, rng: &mut Rng, type_id: TypeId) -> bool {
        let it = self.types.get(type_id).clone();
        if self.runner.load_error.is_some()
            || self.at_capacity(&it, now)
            || self.at_quota(now)
            || self.create_throttle.is_some_and(|t| now < t)
        {
            return false;
        }
        let limit = self.cfg.cloud_vms.max_concurrent_instance_create_ops;
        if limit > 0 && self.creating.len() >= limit {
            tracing::info!(limit, "reached MaxConcurrentInstanceCreateOps");
            self.create_throttle = Some(now + CREATE_CONCURRENCY_HOLDOFF);
            return false;
        }
        let secret = loop {
            let s = rng.hex(20);
            if !self.creating.contains_key(&s) {
                break s;
            }
        };
        self.creating.insert(
            secret.clone(),
            Creating {
                type_id,
                started: now,
            },
        );
        let max = self.cfg.cloud_vms.max_instances;
        if max > 0 && self.instance_count() == max {
            tracing::info!(max, "reached MaxInstances");
        }
        self.cloud_queue.push_back(CloudReq::Create(secret));
        true
    }

    /// `Shutdown(id)`: only booting or idle workers that are not on hold.
    pub fn shutdown(&mut self, now: Timestamp, id: &str) -> bool {
        let ok = self.workers.get(&Key::new(id)).is_some_and(|w| {
            w.idle_behavior != IdleBehavior::Hold
                && matches!(w.state, WorkerState::Booting | WorkerState::Idle)
        });
        if ok {
            self.report_boot(id, BootOutcome::Aborted);
            self.shutdown_worker(now, id);
        }
        ok
    }

    /// `StartContainer(id, ctr)`: the worker must be idle or running with behaviour `run`.
    pub fn start_container(
        &mut self,
        now: Timestamp,
        ops: &mut Ops,
        id: &str,
        ctr: &Container,
    ) -> bool {
        let Some(w) = self.workers.get(&Key::new(id)) else {
            return false;
        };
        if !matches!(w.state, WorkerState::Idle | WorkerState::Running)
            || w.idle_behavior != IdleBehavior::Run
            || self.book.index.contains_key(&ctr.uuid)
        {
            return false;
        }
        let mut args = vec![format!(
            "--runtime-engine={}",
            self.cfg.containers.runtime_engine
        )];
        args.extend(
            self.cfg
                .containers
                .crunch_run_arguments_list
                .iter()
                .cloned(),
        );
        let command =
            remote::start_command(&self.runner.command, &w.info.remote_user, &args, &ctr.uuid);
        let stdin = ExecStdin::ConfigData {
            uuid: ctr.uuid.to_string(),
            instance_type: w.itype.clone(),
            address: w.info.address.clone(),
        };
        let op = ops.issue(
            now,
            self.cfg.tuning.exec_timeout,
            Pending::Exec(
                id.to_string(),
                ExecPurpose::StartRunner {
                    uuid: ctr.uuid.to_string(),
                },
            ),
            CommandKind::Exec {
                instance: id.to_string(),
                purpose: ExecPurpose::StartRunner {
                    uuid: ctr.uuid.to_string(),
                },
                command,
                stdin,
            },
        );
        let w = self.workers.get_mut(&Key::new(id)).expect("checked above");
        let mut r = Runner::new(&ctr.uuid, ctr.created_at);
        r.start_op = Some(op);
        w.starting.insert(Key::new(&ctr.uuid), r);
        self.book.started(&ctr.uuid, id, w.slot);
        if w.state != WorkerState::Running {
            w.state = WorkerState::Running;
            self.changed = true;
        }
        self.stamp += 1;
        w.version = self.stamp;
        true
    }

    /// `KillContainer(uuid, reason)`: starts the SIGTERM loop if a runner exists.
    pub fn kill_container(
        &mut self,
        now: Timestamp,
        ops: &mut Ops,
        uuid: &str,
        reason: &str,
    ) -> bool {
        let Some(id) = self.book.holder(uuid).cloned() else {
            return false;
        };
        let term = self.timeout_term();
        let w = self
            .workers
            .get_mut(&id)
            .expect("runner index is consistent");
        let r = w.runner_mut(uuid).expect("runner index is consistent");
        if r.stopping {
            return true;
        }
        tracing::info!(container = %uuid, instance = %id, reason, "killing crunch-run process");
        r.stopping = true;
        r.kill_deadline = now + term;
        r.kill_reason = reason.to_string();
        self.kill_step(now, ops, &id, uuid);
        true
    }

    /// `ForgetContainer(uuid)`: drops the exit placeholder.
    pub fn forget_container(&mut self, uuid: &str) {
        self.book.unexit(uuid);
    }

    /// `KillInstance(id, reason)`: destroys the VM whatever its state or behaviour.
    pub fn kill_instance(
        &mut self,
        now: Timestamp,
        id: &str,
        reason: &str,
    ) -> Result<(), AdminError> {
        if !self.workers.contains_key(&Key::new(id)) {
            return Err(AdminError::InstanceNotFound);
        }
        tracing::info!(instance = %id, reason, "killing instance");
        self.report_boot(id, BootOutcome::Aborted);
        self.shutdown_worker(now, id);
        Ok(())
    }

    /// `SetIdleBehavior(id, b)`.
    pub fn set_idle_behavior(
        &mut self,
        now: Timestamp,
        id: &str,
        b: IdleBehavior,
    ) -> Result<(), AdminError> {
        let w = self
            .workers
            .get_mut(&Key::new(id))
            .ok_or(AdminError::NoSuchInstance)?;
        tracing::info!(instance = %id, idle_behavior = %b, "set idle behavior");
        w.idle_behavior = b;
        self.changed = true;
        self.save_tags(id);
        self.shutdown_if_idle(now, id);
        Ok(())
    }

    // ----- internal state changes -----------------------------------------------------------

    fn report_boot(&mut self, id: &str, o: BootOutcome) {
        if let Some(w) = self.workers.get_mut(&Key::new(id))
            && !w.boot_reported
        {
            w.boot_reported = true;
            self.metrics.boot(o);
        }
    }

    fn shutdown_worker(&mut self, now: Timestamp, id: &str) {
        let Some(w) = self.workers.get_mut(&Key::new(id)) else {
            return;
        };
        tracing::info!(instance = %id, state = %w.state, "shutting down instance");
        w.state = WorkerState::Shutdown;
        w.destroyed = Some(now);
        self.stamp += 1;
        w.version = self.stamp;
        // Starting runners cannot start on a VM being destroyed; they are dropped without an
        // exit record, as Go's Close() does, so the scheduler requeues them.
        let starting: Vec<String> = std::mem::take(&mut w.starting)
            .into_keys()
            .map(String::from)
            .collect();
        for uuid in starting {
            self.book.dropped(&uuid);
        }
        self.changed = true;
        self.queue_cloud(CloudReq::Destroy(id.to_string()));
    }

    fn queue_cloud(&mut self, req: CloudReq) {
        if self.cloud_queue.contains(&req) {
            return;
        }
        if self.cloud_queue.len() >= CLOUD_QUEUE_MAX && !matches!(req, CloudReq::Create(_)) {
            tracing::warn!(
                ?req,
                "cloud call queue full; dropping request until the next sync"
            );
            return;
        }
        self.cloud_queue.push_back(req);
    }

    /// `eligibleForShutdown` (§1.5), with the fix that an unknown worker with containers is not
    /// shut down for being unknown too long (docs/compatibility.md).
    fn eligible_for_shutdown(&self, now: Timestamp, w: &Worker) -> bool {
        if w.idle_behavior == IdleBehavior::Hold {
            return false;
        }
        let draining = w.idle_behavior == IdleBehavior::Drain;
        match w.state {
            WorkerState::Booting => draining,
            WorkerState::Idle => draining || now.since(w.busy) >= self.timeout_idle(),
            WorkerState::Running => {
                draining
                    && w.running
                        .values()
                        .chain(w.starting.values())
                        .all(|r| r.givenup)
            }
            WorkerState::Unknown => {
                w.runner_count() == 0 && now.since(w.appeared) >= self.timeout_booting()
            }
            WorkerState::Shutdown => false,
        }
    }

    fn shutdown_if_idle(&mut self, now: Timestamp, id: &str) -> bool {
        let Some(w) = self.workers.get(&Key::new(id)) else {
            return false;
        };
        if !self.eligible_for_shutdown(now, w) {
            return false;
        }
        tracing::info!(instance = %id, state = %w.state, idle_behavior = %w.idle_behavior,
            "shutdown idle worker");
        self.report_boot(id, BootOutcome::Aborted);
        self.shutdown_worker(now, id);
        true
    }

    fn desired_tags(&self, w: &Worker) -> BTreeMap<String, String> {
        let mut tags = w.info.tags.clone();
        tags.insert(self.tag("InstanceType"), w.itype.name.clone());
        tags.insert(
            self.tag("IdleBehavior"),
            w.idle_behavior.as_str().to_string(),
        );
        tags
    }

    fn save_tags(&mut self, id: &str) {
        let Some(w) = self.workers.get_mut(&Key::new(id)) else {
            return;
        };
        if w.state == WorkerState::Shutdown || w.tags_busy || self.tag_keys.current(w) {
            return;
        }
        w.tags_busy = true;
        self.queue_cloud(CloudReq::SetTags(id.to_string()));
    }

    fn close_runner(&mut self, now: Timestamp, id: &str, uuid: &str) -> bool {
        let Some(w) = self.workers.get_mut(&Key::new(id)) else {
            return false;
        };
        if w.running.remove(uuid).is_none() {
            return false;
        }
        self.book.exited_at(uuid, now);
        self.stamp += 1;
        w.version = self.stamp;
        if w.state == WorkerState::Running && w.runner_count() == 0 {
            w.state = WorkerState::Idle;
        }
        self.changed = true;
        true
    }

    /// Adds or refreshes a worker from a listing or a finished create (`updateWorker`, §1.3).
    fn update_worker(
        &mut self,
        now: Timestamp,
        info: Arc<InstanceInfo>,
        secret_hint: Option<&str>,
    ) {
        self.stamp += 1;
        let stamp = self.stamp;
        if let Some(w) = self.workers.get_mut(&Key::new(&info.id)) {
            w.set_info(info);
            w.seen = stamp;
            let id = w.id.clone();
            self.save_tags(&id);
            return;
        }
        let type_name = info
            .tags
            .get(&self.tag_keys.instance_type)
            .cloned()
            .unwrap_or_default();
        let secret = secret_hint
            .map(str::to_string)
            .or_else(|| info.tags.get(&self.tag("InstanceSecret")).cloned())
            .unwrap_or_default();
        let state = if self.creating.contains_key(&secret) {
            WorkerState::Booting
        } else {
            WorkerState::Unknown
        };
        let (type_id, itype) = match self.types.id(&type_name) {
            Some(t) => (Some(t), self.types.get(t).clone()),
            None => (
                None,
                Arc::new(InstanceType {
                    name: type_name.clone(),
                    ..InstanceType::default()
                }),
            ),
        };
        let mut idle_behavior = info
            .tags
            .get(&self.tag("IdleBehavior"))
            .and_then(|b| IdleBehavior::parse(b))
            .unwrap_or(IdleBehavior::Run);
        if itype.provider_type.is_empty() && idle_behavior != IdleBehavior::Hold {
            idle_behavior = IdleBehavior::Drain;
        }
        tracing::info!(instance = %info.id, state = %state, instance_type = %type_name,
            idle_behavior = %idle_behavior, "instance appeared in cloud");
        let id = info.id.clone();
        self.workers.insert(
            Key::new(&id),
            Worker {
                id: id.clone(),
                slot: self.slots.take(),
                list_probe: ListProbe::of(&info),
                info,
                type_id,
                itype,
                state,
                idle_behavior,
                secret,
                appeared: now,
                probed: now,
                busy: now,
                destroyed: None,
                version: stamp,
                seen: stamp,
                first_ssh: None,
                stale_since: None,
                running: RunnerMap::default(),
                starting: BTreeMap::new(),
                last_uuid: String::new(),
                boot_reported: false,
                probe: None,
                tags_busy: false,
                tags_sent: None,
                tags_current_for: None,
            },
        );
        self.changed = true;
        self.save_tags(&id);
    }

    fn remove_worker(&mut self, now: Timestamp, id: &str) {
        let Some(w) = self.workers.remove(&Key::new(id)) else {
            return;
        };
        self.slots.give(w.slot);
        tracing::info!(instance = %id, state = %w.state, "instance disappeared from cloud");
        self.metrics.instances_disappeared[w.state as usize] += 1;
        if !w.boot_reported {
            self.metrics.boot(BootOutcome::Disappeared);
        }
        if let Some(d) = w.destroyed {
            self.metrics
                .shutdown_to_disappearance
                .observe(now, now.since(d).as_secs_f64());
        }
        // Runners are abandoned without an exit record.
        for uuid in w.running.keys().chain(w.starting.keys()) {
            self.book.dropped(uuid);
            self.kill_timers.retain(|(_, u)| u != uuid);
        }
        self.probe_queue.retain(|p| !str_eq(p.as_str(), id));
        self.changed = true;
    }

    // ----- completions ----------------------------------------------------------------------

    /// A create finished (or the core gave up on it).
    pub fn create_finished(
        &mut self,
        now: Timestamp,
        secret: &str,
        result: Result<InstanceInfo, CloudError>,
    ) {
        self.metrics.driver_op("Create", result.is_err());
        match result {
            Ok(info) => {
                self.update_worker(now, Arc::new(info), Some(secret));
            }
            Err(err) => {
                let it = self
                    .creating
                    .get(secret)
                    .map(|c| self.types.get(c.type_id).clone());
                tracing::error!(error = %err, instance_type = it.as_ref().map(|t| t.name.as_str()).unwrap_or(""),
                    is_quota_error = matches!(err.kind, CloudErrorKind::Quota),
                    is_capacity_error = matches!(err.kind, CloudErrorKind::Capacity(_)),
                    "create failed");
                match err.kind {
                    CloudErrorKind::Quota => {
                        let n = self.instance_count().saturating_sub(1);
                        if n < 1 {
                            self.quota_until_fewer = 0;
                            self.quota_until = Some(now + QUOTA_ERROR_TTL);
                        } else if self.quota_until_fewer == 0 || n < self.quota_until_fewer {
                            self.quota_until_fewer = n;
                            self.quota_until = None;
                        }
                    }
                    CloudErrorKind::Capacity(scope) => {
                        let key = match (scope, &it) {
                            (CapacityScope::InstanceType, Some(t)) => t.capacity_key(),
                            (CapacityScope::QuotaGroup, Some(t)) => t.quota_group.clone(),
                            _ => String::new(),
                        };
                        self.capacity.insert(key, now + CAPACITY_ERROR_TTL);
                    }
                    CloudErrorKind::RateLimited { retry_at } if retry_at > now => {
                        tracing::warn!(until = %retry_at, "suspending remote calls due to rate-limit error");
                        self.create_throttle = Some(retry_at);
                    }
                    _ => {}
                }
            }
        }
        self.creating.remove(secret);
        self.changed = true;
    }

    /// A destroy finished. Errors are only logged; sync retries.
    pub fn destroy_finished(&mut self, id: &str, result: Result<(), CloudError>) {
        self.metrics.driver_op("Destroy", result.is_err());
        if let Err(err) = result {
            tracing::warn!(instance = %id, error = %err, "destroy failed");
        }
    }

    /// A set-tags call finished.
    pub fn tags_set(&mut self, id: &str, result: Result<(), CloudError>) {
        self.metrics.driver_op("SetTags", result.is_err());
        let Some(w) = self.workers.get_mut(&Key::new(id)) else {
            return;
        };
        w.tags_busy = false;
        let sent = w.tags_sent.take();
        match result {
            Ok(()) => {
                if let Some(t) = sent {
                    Arc::make_mut(&mut w.info).tags = t;
                }
                // The behaviour may have changed while the call ran.
                self.save_tags(id);
            }
            Err(err) => tracing::warn!(instance = %id, error = %err, "set tags failed"),
        }
    }

    /// The scheduler's create was refused at MaxConcurrentInstanceCreateOps: hold creates.
    pub fn create_limit_reached(&mut self, now: Timestamp) {
        tracing::info!("reached MaxConcurrentInstanceCreateOps");
        self.create_throttle = Some(now + CREATE_CONCURRENCY_HOLDOFF);
    }

    /// A list finished: reconcile workers with the cloud (`sync`, §1.8).
    pub fn listed(
        &mut self,
        now: Timestamp,
        threshold: u64,
        result: Result<Vec<Arc<InstanceInfo>>, CloudError>,
    ) {
        self.metrics.driver_op("List", result.is_err());
        self.list_busy = false;
        let list = match result {
            Ok(l) => l,
            Err(err) => {
                if let CloudErrorKind::RateLimited { retry_at } = err.kind
                    && retry_at > now
                {
                    tracing::warn!(until = %retry_at, "suspending remote calls due to rate-limit error");
                    self.list_throttle = Some(retry_at);
                }
                tracing::warn!(error = %err, "sync failed");
                return;
            }
        };
        // Every worker this listing refreshes gets a stamp above `first`: a second record with
        // the same ID is skipped.
        let listing = Listing {
            now,
            first: self.stamp,
            shutdown_timeout: self.timeout_shutdown(),
        };
        // Listings usually come in ID order, as the map: one merge finds each record's worker
        // (by the record's address when the worker holds that very record, without reading
        // it). A record the merge cannot place (a new instance, or one out of order) goes
        // through a lookup, and the merge resumes after it.
        let mut list = list.into_iter();
        let mut resume = Resume::Start;
        while let Some(info) = self.listed_merge(&listing, &mut list, &mut resume) {
            let w = self.workers.get_mut(&Key::new(&info.id));
            if !of_this_set(w.as_deref(), &info, &self.tag_keys, &self.instance_set_id) {
                continue;
            }
            let Some(w) = w else {
                self.update_worker(now, info, None);
                continue;
            };
            if let Some(req) = refresh_listed(w, info, &listing, &mut self.stamp, &self.tag_keys) {
                self.queue_cloud(req);
            }
        }
        let gone: Vec<String> = self
            .workers
            .values()
            .filter(|w| w.seen <= threshold)
            .map(|w| w.id.clone())
            .collect();
        for id in gone {
            self.remove_worker(now, &id);
        }
        if self.quota_until_fewer > self.instance_count() {
            self.quota_until_fewer = 0;
            self.changed = true;
        }
        if !self.loaded {
            self.loaded = true;
            self.changed = true;
        }
    }

    /// [`Pool::listed`]'s merge: refreshes the workers of `list`'s records in one walk of the
    /// map from `resume`, until a record whose worker is not next in the map (a new instance,
    /// or a listing out of ID order), which it returns (`resume` then says where to go on).
    fn listed_merge(
        &mut self,
        listing: &Listing,
        list: &mut impl Iterator<Item = Arc<InstanceInfo>>,
        resume: &mut Resume,
    ) -> Option<Arc<InstanceInfo>> {
        let mut reqs = Vec::new();
        let mut unplaced = None;
        {
            let mut ws = match std::mem::replace(resume, Resume::End) {
                Resume::Start => self.workers.range_mut::<Key, _>(..),
                Resume::At(k) => self.workers.range_mut::<Key, _>(k..),
                // Past the last worker, every record goes through a lookup.
                Resume::End => return list.next(),
            }
            .peekable();
            for info in list.by_ref() {
                let found = loop {
                    let Some((k, w)) = ws.peek() else {
                        break None;
                    };
                    if Arc::ptr_eq(&w.info, &info) {
                        break ws.next();
                    }
                    match str_cmp(k.as_str(), &info.id) {
                        Ordering::Less => {
                            ws.next();
                        }
                        Ordering::Equal => break ws.next(),
                        Ordering::Greater => break None,
                    }
                };
                let Some((_, w)) = found else {
                    *resume = ws
                        .peek()
                        .map_or(Resume::End, |(k, _)| Resume::At((*k).clone()));
                    unplaced = Some(info);
                    break;
                };
                if of_this_set(Some(w), &info, &self.tag_keys, &self.instance_set_id) {
                    let req = refresh_listed(w, info, listing, &mut self.stamp, &self.tag_keys);
                    reqs.extend(req);
                }
            }
        }
        for req in reqs {
            self.queue_cloud(req);
        }
        unplaced
    }

    /// The SSH layer reached host-key verification on `id`.
    pub fn ssh_connected(&mut self, now: Timestamp, id: &str) {
        if let Some(w) = self.workers.get_mut(&Key::new(id))
            && w.state == WorkerState::Booting
            && w.first_ssh.is_none()
        {
            w.first_ssh = Some(now);
            self.metrics
                .time_to_ssh
                .observe(now, now.since(w.appeared).as_secs_f64());
        }
    }

    /// A remote command finished.
    pub fn exec_finished(&mut self, now: Timestamp, ops: &mut Ops, done: ExecDone) {
        let ExecDone {
            op,
            issued,
            instance,
            purpose,
            result,
        } = done;
        let id = instance.as_str();
        match purpose {
            ExecPurpose::StartRunner { uuid } => self.start_finished(now, id, &uuid, op, result),
            ExecPurpose::KillRunner { uuid } => self.kill_finished(now, ops, id, &uuid, op, result),
            // The run probe, the last step: straight to its end, which looks the worker up.
            ExecPurpose::ListProbe => self.finish_probe(now, id, Some((op, issued, result))),
            _ => self.probe_step_finished(now, ops, op, issued, id, result),
        }
    }

    fn start_finished(
        &mut self,
        now: Timestamp,
        id: &str,
        uuid: &str,
        op: OpId,
        result: Result<ExecOutput, ExecError>,
    ) {
        if let Err(err) = &result {
            tracing::warn!(instance = %id, container = %uuid, error = %err.message,
                stderr = %err.stderr, "error starting crunch-run process");
        }
        let Some(w) = self.workers.get_mut(&Key::new(id)) else {
            return;
        };
        let Some(r) = w.starting.get(uuid) else {
            return;
        };
        if r.start_op != Some(op) {
            return;
        }
        let mut r = w.starting.remove(uuid).expect("checked");
        self.metrics
            .queue_to_crunch_run
            .observe(now, now.since(r.created_at).as_secs_f64());
        r.start_op = None;
        w.running.insert(Key::new(uuid), r);
        w.busy = now;
        w.last_uuid = uuid.to_string();
        self.stamp += 1;
        w.version = self.stamp;
        self.changed = true;
    }

    fn kill_step(&mut self, now: Timestamp, ops: &mut Ops, id: &str, uuid: &str) {
        let signal = self.timeout_signal();
        let exec_timeout = self
            .cfg
            .tuning
            .exec_timeout
            .min(signal.max(Duration::from_secs(1)));
        let runner_cmd = self.runner.command.clone();
        let Some(w) = self.workers.get_mut(&Key::new(id)) else {
            return;
        };
        let user = w.info.remote_user.clone();
        let hold = w.idle_behavior == IdleBehavior::Hold;
        let Some(r) = w.runner_mut(uuid) else {
            return;
        };
        if !r.stopping || r.givenup || r.kill_op.is_some() {
            return;
        }
        if now > r.kill_deadline {
            r.givenup = true;
            tracing::warn!(container = %uuid, instance = %id, "crunch-run process unkillable; giving up");
            if hold {
                tracing::warn!(instance = %id, "unkillable container on a held worker");
            } else {
                w.idle_behavior = IdleBehavior::Drain;
                self.changed = true;
                self.save_tags(id);
            }
            self.shutdown_if_idle(now, id);
            return;
        }
        let op = ops.issue(
            now,
            exec_timeout,
            Pending::Exec(
                id.to_string(),
                ExecPurpose::KillRunner {
                    uuid: uuid.to_string(),
                },
            ),
            CommandKind::Exec {
                instance: id.to_string(),
                purpose: ExecPurpose::KillRunner {
                    uuid: uuid.to_string(),
                },
                command: remote::kill_command(&runner_cmd, &user, uuid),
                stdin: ExecStdin::Empty,
            },
        );
        r.kill_op = Some(op);
        self.kill_timers.insert((now + signal, uuid.to_string()));
    }

    fn kill_finished(
        &mut self,
        now: Timestamp,
        ops: &mut Ops,
        id: &str,
        uuid: &str,
        op: OpId,
        result: Result<ExecOutput, ExecError>,
    ) {
        let Some(w) = self.workers.get_mut(&Key::new(id)) else {
            return;
        };
        let Some(r) = w.runner_mut(uuid) else {
            return;
        };
        if r.kill_op != Some(op) {
            return;
        }
        r.kill_op = None;
        match result {
            Ok(_) => {
                // onKilled: a no-op for a runner still starting (reference-workers.md §9.2.12).
                self.close_runner(now, id, uuid);
            }
            Err(err) => {
                tracing::info!(container = %uuid, instance = %id, error = %err.message, "kill attempt failed");
                // If the signal interval already passed while the command ran, go again now.
                if !self.kill_timers.iter().any(|(_, u)| u == uuid) {
                    self.kill_step(now, ops, id, uuid);
                }
            }
        }
    }

    // ----- probes ---------------------------------------------------------------------------

    /// Starts a probe of `id` now, unless one is in progress (probes are single-flight). The
    /// probe loop calls this at `MaxProbesPerSecond`; tests and admin tools may call it directly.
    pub fn probe_now(&mut self, now: Timestamp, ops: &mut Ops, id: &str) {
        let Some(w) = self.workers.get_mut(&Key::new(id)) else {
            return;
        };
        if w.probe.is_some() || w.state == WorkerState::Shutdown {
            return;
        }
        let s0 = w.state;
        let v0 = w.version;
        let ready = matches!(s0, WorkerState::Idle | WorkerState::Running);
        let step = if ready {
            ProbeStep::List
        } else {
            ProbeStep::Boot
        };
        let op = ProbeCommands::of(&self.cfg, &self.runner, &self.list_commands)
            .issue(now, ops, id, w, step);
        w.probe = Some(Probe {
            op,
            step,
            started: now,
            v0,
            s0,
            booted: ready,
            last_error: String::new(),
        });
    }

    /// Issues the probe's next step, `step`, for the worker `id`.
    fn advance_probe(&mut self, now: Timestamp, ops: &mut Ops, id: &str, step: ProbeStep) {
        let w = self
            .workers
            .get_mut(&Key::new(id))
            .expect("probe in progress");
        let op = ProbeCommands::of(&self.cfg, &self.runner, &self.list_commands)
            .issue(now, ops, id, w, step);
        let p = w.probe.as_mut().expect("probe in progress");
        p.op = op;
        p.step = step;
    }

    /// After the boot step (or the deploy): run the list probe if booted or unknown, else end.
    fn after_boot_and_deploy(&mut self, now: Timestamp, ops: &mut Ops, id: &str) {
        let p = self.workers[id].probe.as_ref().expect("probe in progress");
        if p.booted || p.s0 == WorkerState::Unknown {
            self.advance_probe(now, ops, id, ProbeStep::List);
        } else {
            self.finish_probe(now, id, None);
        }
    }

    fn probe_step_finished(
        &mut self,
        now: Timestamp,
        ops: &mut Ops,
        op: OpId,
        issued: Timestamp,
        id: &str,
        result: Result<ExecOutput, ExecError>,
    ) {
        let Some(w) = self.workers.get_mut(&Key::new(id)) else {
            return;
        };
        let Some(p) = w.probe.as_mut() else {
            return;
        };
        if p.op != op {
            return;
        }
        let state_now = w.state;
        match p.step {
            ProbeStep::Boot => {
                p.booted = result.is_ok();
                let mut should_copy = p.booted || p.s0 == WorkerState::Unknown;
                if let Err(err) = &result {
                    p.last_error = err.message.clone();
                    if matches!(
                        err.kind,
                        crate::core::command::ExecErrorKind::Auth
                            | crate::core::command::ExecErrorKind::HostKey
                            | crate::core::command::ExecErrorKind::Other
                    ) {
                        tracing::warn!(instance = %id, error = %err.message, "boot probe failed");
                    } else {
                        tracing::debug!(instance = %id, error = %err.message, "boot probe failed");
                    }
                    if matches!(state_now, WorkerState::Idle | WorkerState::Running) {
                        p.booted = true;
                        should_copy = false;
                    }
                }
                if should_copy && self.runner.load_error.is_some() {
                    tracing::warn!(instance = %id, "cannot boot worker: error loading runner binary");
                    p.booted = false;
                    p.last_error = self.runner.load_error.clone().unwrap_or_default();
                    self.after_boot_and_deploy(now, ops, id);
                } else if should_copy && self.runner.md5.is_some() {
                    self.advance_probe(now, ops, id, ProbeStep::Md5);
                } else {
                    self.after_boot_and_deploy(now, ops, id);
                }
            }
            ProbeStep::Md5 => {
                let md5 = self.runner.md5.clone().unwrap_or_default();
                let expected = remote::md5_expected(&self.runner.command, &md5);
                match result {
                    Ok(out) if out.stderr.is_empty() && out.stdout == expected => {
                        self.after_boot_and_deploy(now, ops, id);
                    }
                    _ => self.advance_probe(now, ops, id, ProbeStep::Install),
                }
            }
            ProbeStep::Install => {
                if let Err(err) = result {
                    tracing::warn!(instance = %id, error = %err.message, stderr = %err.stderr, "error copying runner binary");
                    p.booted = false;
                    p.last_error = err.message;
                }
                self.after_boot_and_deploy(now, ops, id);
            }
            // `exec_finished` sends run probes to `finish_probe` without this lookup.
            ProbeStep::List => self.finish_probe(now, id, Some((op, issued, result))),
        }
    }

    /// The end of `probeAndUpdate` (§2.4 steps 4–6). `list` is the run probe's command, when
    /// it ran, and its outcome: a late one (not the probe's current command) is ignored.
    fn finish_probe(
        &mut self,
        now: Timestamp,
        id: &str,
        list: Option<(OpId, Timestamp, Result<ExecOutput, ExecError>)>,
    ) {
        let stale_timeout = self.timeout_stale_run_lock();
        let (timeout_booting, timeout_probe) = (self.timeout_booting(), self.timeout_probe());
        let (ok, report) = match &list {
            Some((_, _, Ok(out))) => (true, remote::parse_list(&out.stdout, &self.cfg.cluster_id)),
            _ => (false, remote::ListReport::default()),
        };
        let Some(w) = self.workers.get_mut(&Key::new(id)) else {
            return;
        };
        if let Some((op, issued, result)) = &list {
            let Some(p) = w.probe.as_ref().filter(|p| p.op == *op) else {
                return;
            };
            debug_assert_eq!(p.step, ProbeStep::List);
            let secs = now.since(*issued).as_secs_f64();
            match result {
                Ok(_) => self.metrics.run_probe_success.observe(now, secs),
                Err(err) => {
                    self.metrics.run_probe_fail.observe(now, secs);
                    tracing::warn!(instance = %id, error = %err.message, stdout = %err.stdout,
                        stderr = %err.stderr, "probe failed");
                }
            }
        }
        let p = w.probe.take().expect("probe in progress");
        let mut broken = report.broken;
        if ok {
            if report.stale {
                let since = *w.stale_since.get_or_insert(now);
                tracing::info!(instance = %id, "probe reported stale run lock");
                if now.since(since) > stale_timeout {
                    tracing::warn!(instance = %id,
                        "reporting broken after reporting stale run lock for too long");
                    broken = true;
                }
            } else {
                w.stale_since = None;
            }
        }
        // The worker looked up above, unless reporting it broken needed the whole pool.
        let w = if broken && w.idle_behavior == IdleBehavior::Run {
            tracing::warn!(instance = %id, "probe reported broken instance");
            self.report_boot(id, BootOutcome::Failure);
            let w = self.workers.get_mut(&Key::new(id)).expect("exists");
            w.idle_behavior = IdleBehavior::Drain;
            self.changed = true;
            self.save_tags(id);
            self.workers.get_mut(&Key::new(id)).expect("exists")
        } else {
            w
        };
        if !ok || (!p.booted && report.uuids.is_empty() && w.running.is_empty()) {
            if w.state == WorkerState::Shutdown && w.version != p.v0 {
                return;
            }
            let dur = p.started.since(w.probed);
            let booting = matches!(w.state, WorkerState::Unknown | WorkerState::Booting);
            let threshold = if booting {
                timeout_booting
            } else {
                timeout_probe
            };
            if w.idle_behavior != IdleBehavior::Hold
                && w.state != WorkerState::Shutdown
                && dur >= threshold
            {
                let new = if booting { "new " } else { "" };
                tracing::warn!(instance = %id, state = %w.state, since_last_success = ?dur,
                    "{new}instance unresponsive, shutting down");
                self.shutdown_worker(now, id);
                // As Go: only a probe whose boot step failed counts as a boot failure. A
                // worker that booted but never passed the run probe is counted when it
                // disappears.
                if !p.booted {
                    tracing::info!(instance = %id, error = %p.last_error, "boot failed");
                    self.report_boot(id, BootOutcome::Failure);
                }
            }
            return;
        }
        w.probed = now;
        if w.version != p.v0 {
            return;
        }
        if !report.uuids.is_empty() {
            w.busy = now;
            if w.last_uuid.is_empty() {
                w.last_uuid = report.uuids[0].to_string();
            }
        } else if !w.running.is_empty() {
            w.busy = now;
        }
        let mut changed = false;
        // updateRunning: adopt new UUIDs, promote starting ones, close the ones that left.
        // An instance reports a handful at most: searched in place when there are a few,
        // sorted for lookups otherwise (no set is built).
        let few = report.uuids.len() <= FEW_REPORTED;
        let mut sorted: Vec<&str> = Vec::new();
        if !few {
            sorted.extend(&report.uuids);
            sorted.sort_unstable();
        }
        let is_reported = |u: &str| {
            if few {
                report.uuids.contains(&u)
            } else {
                sorted.binary_search(&u).is_ok()
            }
        };
        let mut adopted = Vec::new();
        for &uuid in &report.uuids {
            if w.running.contains_key(uuid) {
                continue;
            }
            if let Some(r) = w.starting.remove(uuid) {
                w.running.insert(Key::new(uuid), r);
            } else if let Some(other) = self.book.holder(uuid) {
                // The same container reported on a second instance (a leftover process, or a
                // probe that raced an exit). The pool keeps one runner per container: the one
                // it already tracks. This one is adopted once the other is gone.
                tracing::warn!(instance = %id, container = %uuid, other = %other,
                    "crunch-run process reported on two instances; not adopting the second");
                continue;
            } else {
                tracing::info!(instance = %id, container = %uuid, "crunch-run process detected");
                w.running
                    .insert(Key::new(uuid), Runner::new(uuid, Timestamp::ZERO));
                adopted.push(uuid);
            }
            changed = true;
        }
        let left: Vec<String> = w
            .running
            .keys()
            .filter(|u| !is_reported(u))
            .map(String::from)
            .collect();
        let (first_ssh, state, slot) = (w.first_ssh, w.state, w.slot);
        let booted_now = p.booted && matches!(state, WorkerState::Unknown | WorkerState::Booting);
        // The worker looked up above, unless adopting or closing runners needed the pool.
        let w = if adopted.is_empty() && left.is_empty() {
            w
        } else {
            for uuid in adopted {
                self.book.started(uuid, id, slot);
            }
            for uuid in &left {
                self.close_runner(now, id, uuid);
                changed = true;
            }
            self.workers.get_mut(&Key::new(id)).expect("exists")
        };
        if booted_now {
            if state == WorkerState::Booting
                && let Some(t) = first_ssh
            {
                self.metrics
                    .time_to_ready
                    .observe(now, now.since(t).as_secs_f64());
            }
            w.state = WorkerState::Idle;
            changed = true;
        }
        if !changed {
            return;
        }
        if w.state == WorkerState::Unknown {
            tracing::info!(instance = %id, "crunch-run probe succeeded, but boot probe is still failing");
        }
        if matches!(w.state, WorkerState::Idle | WorkerState::Running) {
            w.state = if w.runner_count() > 0 {
                WorkerState::Running
            } else {
                WorkerState::Idle
            };
        }
        self.stamp += 1;
        w.version = self.stamp;
        if booted_now {
            tracing::info!(instance = %id, "probes succeeded, instance is in service");
            self.report_boot(id, BootOutcome::Success);
        }
        self.changed = true;
    }

    // ----- time -----------------------------------------------------------------------------

    /// Runs everything due at `now`: sync, probe rounds and launches, kill loops, cloud calls
    /// and TTL expiries.
    pub fn handle_timeout(&mut self, now: Timestamp, ops: &mut Ops, rng: &mut Rng) {
        self.expire_ttls(now);
        if now >= self.next_sync_at && !self.list_busy {
            self.next_sync_at = now + self.sync_interval();
            if self.list_throttle.is_some_and(|t| now < t) {
                tracing::warn!("sync failed: remote calls are suspended (rate limit)");
            } else {
                self.list_busy = true;
                self.queue_cloud(CloudReq::List);
            }
        }
        if now >= self.next_probe_tick {
            let interval = self.probe_interval();
            self.next_probe_tick = now + interval;
            let jitter_max = crate::core::time::millis(interval) / 23;
            let jitter = rng.below(jitter_max);
            if self.probe_round_at.is_none() {
                self.probe_round_at = Some(Timestamp(now.0 + jitter));
            }
        }
        if let Some(t) = self.probe_round_at
            && now >= t
        {
            self.probe_round_at = None;
            if self.probe_queue.is_empty() {
                // One walk decides, in ID order, which workers shut down as idle and which
                // get probed (eligibility depends on nothing but the worker), reading the IDs
                // from the map's keys; the shutdowns then run in the same order.
                let mut idle: Vec<Key> = Vec::new();
                let mut probe: VecDeque<Key> = VecDeque::with_capacity(self.workers.len());
                for (id, w) in &self.workers {
                    if w.state == WorkerState::Shutdown {
                        continue;
                    }
                    if self.eligible_for_shutdown(now, w) {
                        idle.push(id.clone());
                    } else {
                        probe.push_back(id.clone());
                    }
                }
                for id in idle {
                    let shut = self.shutdown_if_idle(now, &id);
                    debug_assert!(shut, "eligibility depends on the worker alone");
                }
                self.probe_queue = probe;
            }
        }
        while !self.probe_queue.is_empty() && now >= self.probe_next_launch {
            let id = self.probe_queue.pop_front().expect("non-empty");
            self.probe_now(now, ops, &id);
            // Worked out per launch, not per timeout: most timeouts launch nothing.
            let pace = per_second(self.cfg.cloud_vms.max_probes_per_second, 10.0);
            self.probe_next_launch = now + pace;
        }
        // Looked at in place: most timeouts find the first kill timer in the future.
        while self.kill_timers.first().is_some_and(|(t, _)| *t <= now) {
            let (_, uuid) = self.kill_timers.pop_first().expect("checked");
            if let Some(id) = self.book.holder(&uuid).cloned() {
                self.kill_step(now, ops, &id, &uuid);
            }
        }
        self.issue_cloud_calls(now, ops);
    }

    fn expire_ttls(&mut self, now: Timestamp) {
        if self.quota_until.is_some_and(|t| now >= t) {
            self.quota_until = None;
            self.changed = true;
        }
        if self.create_throttle.is_some_and(|t| now >= t) {
            self.create_throttle = None;
            self.changed = true;
        }
        if self.list_throttle.is_some_and(|t| now >= t) {
            self.list_throttle = None;
            self.changed = true;
        }
        let before = self.capacity.len();
        self.capacity.retain(|_, t| now < *t);
        if self.capacity.len() != before {
            self.changed = true;
        }
    }

    fn issue_cloud_calls(&mut self, now: Timestamp, ops: &mut Ops) {
        let rate = self.cfg.cloud_vms.max_cloud_ops_per_second;
        let timeout = self.cfg.tuning.cloud_call_timeout;
        while !self.cloud_queue.is_empty() && (rate <= 0.0 || now >= self.cloud_next_at) {
            let req = self.cloud_queue.pop_front().expect("non-empty");
            if rate > 0.0 {
                self.cloud_next_at = now + per_second(rate, rate);
            }
            match req {
                CloudReq::Create(secret) => {
                    let Some(c) = self.creating.get(&secret) else {
                        continue;
                    };
                    let it = self.types.get(c.type_id).clone();
                    let mut tags = self.cfg.cloud_vms.resource_tags.clone();
                    tags.insert(self.tag("InstanceSetID"), self.instance_set_id.clone());
                    tags.insert(self.tag("InstanceType"), it.name.clone());
                    tags.insert(
                        self.tag("IdleBehavior"),
                        IdleBehavior::Run.as_str().to_string(),
                    );
                    tags.insert(self.tag("InstanceSecret"), secret.clone());
                    let init_command =
                        remote::init_command(&secret, &self.cfg.cloud_vms.instance_init_command);
                    ops.issue(
                        now,
                        timeout,
                        Pending::Create(secret),
                        CommandKind::Create {
                            instance_type: it,
                            image_id: self.cfg.cloud_vms.image_id.clone(),
                            tags,
                            init_command,
                            install_public_key: self.cfg.cloud_vms.deploy_public_key,
                        },
                    );
                }
                CloudReq::Destroy(id) => {
                    if !self.workers.contains_key(&Key::new(&id)) {
                        continue;
                    }
                    ops.issue(
                        now,
                        timeout,
                        Pending::Destroy(id.clone()),
                        CommandKind::Destroy { instance: id },
                    );
                }
                CloudReq::List => {
                    let threshold = self.stamp;
                    let mut tags = BTreeMap::new();
                    tags.insert(self.tag("InstanceSetID"), self.instance_set_id.clone());
                    ops.issue(
                        now,
                        timeout,
                        Pending::List { threshold },
                        CommandKind::ListInstances { tags },
                    );
                }
                CloudReq::SetTags(id) => {
                    let Some(w) = self.workers.get(&Key::new(&id)) else {
                        continue;
                    };
                    let tags = self.desired_tags(w);
                    self.workers
                        .get_mut(&Key::new(&id))
                        .expect("exists")
                        .tags_sent = Some(tags.clone());
                    ops.issue(
                        now,
                        timeout,
                        Pending::SetTags(id.clone()),
                        CommandKind::SetTags { instance: id, tags },
                    );
                }
            }
        }
    }

    /// The earliest time `handle_timeout` has work.
    pub fn next_timeout(&self) -> Option<Timestamp> {
        let list = (!self.list_busy).then_some(self.next_sync_at);
        let launch = (!self.probe_queue.is_empty()).then_some(self.probe_next_launch);
        let cloud = (!self.cloud_queue.is_empty()).then_some(self.cloud_next_at);
        [
            list,
            self.probe_round_at,
            launch,
            cloud,
            self.kill_timers.first().map(|(t, _)| *t),
            self.quota_until,
            self.create_throttle,
            self.list_throttle,
            self.capacity.values().min().copied(),
        ]
        .into_iter()
        .flatten()
        .fold(self.next_probe_tick, Timestamp::min)
        .into()
    }

    // ----- invariants -----------------------------------------------------------------------

    /// Checks the pool's own consistency; returns a description of each violation.
    pub fn check_invariants(&self, ops: &Ops) -> Vec<String> {
        self.check(ops).0
    }

    /// Whether every check of [`Pool::check_invariants`] that visits the workers holds: one
    /// walk that only answers yes or no (the usual answer is yes; when it is no, the full
    /// checks run to say which). Yes also means that no container has runners on two
    /// instances: the workers' (container, worker) pairs and the index's are the same
    /// multiset, and the index has one pair per UUID.
    ///
    /// The two multisets are compared by count and by the sum of a hash of each pair, two
    /// linear walks instead of a tree lookup per runner. Unequal multisets pass with
    /// probability about 2^-64 per check (the sums of distinct pairs' hashes then agree by
    /// chance); the full check, which the tests compare this one with, compares exactly.
    /// `index_sum` is the index's sum, which [`Pool::check`] finds on its own walk of the
    /// index.
    fn workers_consistent(&self, ops: &Ops, index_sum: u64) -> bool {
        let mut runners = 0;
        let mut pairs = 0u64;
        for (id, w) in &self.workers {
            if w.starting_while_shut_down()
                || lost_probe(w, ops).is_some()
                || w.idle_with_runners()
                || w.starting_and_running().next().is_some()
            {
                return false;
            }
            runners += w.runner_count();
            for uuid in w.running.keys().chain(w.starting.keys()) {
                pairs = pairs.wrapping_add(pair_hash(uuid, id, w.slot));
            }
        }
        runners == self.book.index.len() && pairs == index_sum
    }

    /// [`Pool::check_invariants`], and whether no container has runners on two instances
    /// (known without a look when the workers' checks all hold; `false` means "not known").
    pub(crate) fn check(&self, ops: &Ops) -> (Vec<String>, bool) {
        // `Running()` against the runners and the exit placeholders: one merge of the three,
        // which also sums the index's pair hashes for `workers_consistent`. Its findings are
        // reported after the workers'.
        let mut later = Vec::new();
        let mut index_sum = 0u64;
        let mut add = |(uuid, at): (&Key, &RunnerAt)| {
            index_sum = index_sum.wrapping_add(pair_hash(uuid, &at.id, at.slot));
        };
        let mut index = self.book.index.iter().peekable();
        let mut exited = self.book.exited.iter().peekable();
        for (uuid, got) in &self.book.map {
            while let Some(runner) = index.next_if(|(u, _)| *u < uuid) {
                add(runner);
            }
            while exited.next_if(|(u, _)| *u < uuid).is_some() {}
            let want = if index.peek().is_some_and(|(u, _)| *u == uuid) {
                Some(None)
            } else {
                exited
                    .peek()
                    .filter(|(u, _)| *u == uuid)
                    .map(|(_, t)| Some(**t))
            };
            if want != Some(*got) {
                later.push(format!(
                    "Running() entry for {uuid} is {got:?}, want {want:?}"
                ));
            }
        }
        index.for_each(&mut add);
        if self.book.map.len() != self.book.index.len() + self.book.exited.len() {
            later.push(format!(
                "Running() has {} entries; runners {} and exit placeholders {} should be disjoint",
                self.book.map.len(),
                self.book.index.len(),
                self.book.exited.len()
            ));
        }
        let mut v = Vec::new();
        let consistent = self.workers_consistent(ops, index_sum);
        if !consistent {
            self.check_workers(ops, &mut v);
        }
        v.append(&mut later);
        // Instances listed from an earlier process can push the total past MaxInstances, but
        // the pool itself never creates beyond it: creates start only below the limit.
        let max = self.cfg.cloud_vms.max_instances;
        if max > 0 && self.creating.len() > max {
            v.push(format!(
                "{} creates in flight exceed MaxInstances {max}",
                self.creating.len()
            ));
        }
        (v, consistent)
    }

    /// The checks that visit the workers, each violation described.
    fn check_workers(&self, ops: &Ops, v: &mut Vec<String>) {
        // Every runner, in the order the checks below visit them, and which of them the index
        // does not map to their worker: found by one merge of the runners, sorted by UUID, with
        // the index (no lookup per runner).
        let mut runners: Vec<(&Key, &Worker, usize)> = Vec::new();
        for w in self.workers.values() {
            for uuid in w.running.keys().chain(w.starting.keys()) {
                runners.push((uuid, w, runners.len()));
            }
        }
        let indexed = runners.len();
        let mut unindexed = vec![false; indexed];
        // Pushed in visiting order, so the stable sort breaks ties by it.
        runners.sort_by(|a, b| a.0.cmp(b.0));
        let mut index = self.book.index.iter().peekable();
        for &(uuid, w, seq) in &runners {
            while index.next_if(|(u, _)| *u < uuid).is_some() {}
            let ok = index
                .peek()
                .is_some_and(|(u, at)| *u == uuid && str_eq(&at.id, &w.id) && at.slot == w.slot);
            unindexed[seq] = !ok;
        }
        let mut seq = 0;
        for w in self.workers.values() {
            for uuid in w.running.keys().chain(w.starting.keys()) {
                if unindexed[seq] {
                    v.push(format!("runner {uuid} on {} is not indexed to it", w.id));
                }
                seq += 1;
            }
            for uuid in w.starting_and_running() {
                v.push(format!(
                    "runner {uuid} on {} is both starting and running",
                    w.id
                ));
            }
            if w.starting_while_shut_down() {
                v.push(format!("shut-down instance {} has a runner starting", w.id));
            }
            if let Some(op) = lost_probe(w, ops) {
                v.push(format!(
                    "probe of {} waits for {op} which is not in flight",
                    w.id
                ));
            }
            if w.idle_with_runners() {
                v.push(format!("idle instance {} has runners", w.id));
            }
        }
        if indexed != self.book.index.len() {
            v.push(format!(
                "runner index has {} entries but workers hold {indexed} runners",
                self.book.index.len()
            ));
        }
    }
}

/// What issuing a probe step reads of the pool, borrowed field by field, so that the worker
/// it probes can be borrowed from the pool's map at the same time (one lookup per step).
struct ProbeCommands<'p> {
    cfg: &'p Config,
    runner: &'p RunnerSpec,
    list_commands: &'p [String; 2],
}

impl<'p> ProbeCommands<'p> {
    fn of(cfg: &'p Config, runner: &'p RunnerSpec, list_commands: &'p [String; 2]) -> Self {
        ProbeCommands {
            cfg,
            runner,
            list_commands,
        }
    }

    /// Issues the command of probe step `step` for the worker `w`, whose ID is `id`.
    fn issue(&self, now: Timestamp, ops: &mut Ops, id: &str, w: &Worker, step: ProbeStep) -> OpId {
        let user = &w.info.remote_user;
        let runner = &self.runner.command;
        let (purpose, command, stdin, timeout) = match step {
            ProbeStep::Boot => {
                let cmd = if self.cfg.cloud_vms.boot_probe_command.is_empty() {
                    "true".to_string()
                } else {
                    self.cfg.cloud_vms.boot_probe_command.clone()
                };
                (
                    ExecPurpose::BootProbe,
                    cmd,
                    ExecStdin::Empty,
                    self.cfg.tuning.exec_timeout,
                )
            }
            ProbeStep::Md5 => (
                ExecPurpose::RunnerMd5,
                remote::md5_command(runner),
                ExecStdin::Empty,
                self.cfg.tuning.exec_timeout,
            ),
            ProbeStep::Install => (
                ExecPurpose::RunnerInstall,
                remote::install_command(&self.cfg.cloud_vms.deploy_runner_directory, runner, user),
                ExecStdin::RunnerBinary,
                self.cfg.tuning.deploy_timeout,
            ),
            ProbeStep::List => {
                // With a price history (EC2 spot instances), crunch-run gets the prices, plus
                // the added scratch volume's cost, on stdin (§2.3). The worker knows which
                // without loading the record.
                debug_assert_eq!(w.list_probe, ListProbe::of(&w.info), "set with the record");
                let (command, stdin) = match w.list_probe {
                    ListProbe::Plain { sudo } => (
                        self.list_commands[usize::from(sudo)].clone(),
                        ExecStdin::Empty,
                    ),
                    ListProbe::WithPrices => (
                        remote::list_command_with_prices(runner, user),
                        ExecStdin::Text(price::prices_json(&price::probe_prices(
                            &w.info, &w.itype,
                        ))),
                    ),
                };
                (
                    ExecPurpose::ListProbe,
                    command,
                    stdin,
                    self.cfg.tuning.exec_timeout,
                )
            }
        };
        ops.issue(
            now,
            timeout,
            Pending::Exec(id.to_string(), purpose.clone()),
            CommandKind::Exec {
                instance: id.to_string(),
                purpose,
                command,
                stdin,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET: &str = "set-1";
    const U1: &str = "zzzzz-dz642-000000000000001";

    /// A listed record of `id`, of type t1, in instance set `set`, tagged `behavior`.
    fn listed_record(p: &Pool, id: &str, set: &str, behavior: &str) -> Arc<InstanceInfo> {
        let mut tags = BTreeMap::new();
        tags.insert(p.tag("InstanceSetID"), set.to_string());
        tags.insert(p.tag("InstanceType"), "t1".to_string());
        tags.insert(p.tag("IdleBehavior"), behavior.to_string());
        Arc::new(InstanceInfo {
            id: id.to_string(),
            tags,
            ..InstanceInfo::default()
        })
    }

    /// A pool that has listed the instances `ids` (of one configured type).
    fn pool(ids: &[&str]) -> Pool {
        let mut cfg = Config::default();
        let t = InstanceType {
            name: "t1".into(),
            provider_type: "t1".into(),
            vcpus: 2,
            ram: 1 << 30,
            price: 0.1,
            ..InstanceType::default()
        };
        cfg.instance_types.insert("t1".into(), t);
        let types = TypeTable::new(&cfg.instance_types);
        let mut p = Pool::new(
            Arc::new(cfg),
            types,
            RunnerSpec::installed("crunch-run"),
            SET,
            Timestamp(1_000),
        );
        let list = ids
            .iter()
            .map(|id| listed_record(&p, id, SET, "run"))
            .collect();
        p.listed(Timestamp(1_000), 0, Ok(list));
        p
    }

    fn worker<'p>(p: &'p mut Pool, id: &str) -> &'p mut Worker {
        p.workers.get_mut(id).expect("listed")
    }

    /// Workers hold distinct slots, and a gone worker's slot goes to the next new one.
    #[test]
    fn workers_hold_distinct_slots_and_reuse_freed_ones() {
        let mut p = pool(&["i-1", "i-2", "i-3"]);
        let slots = |p: &Pool| -> BTreeMap<String, u32> {
            p.workers
                .iter()
                .map(|(id, w)| (id.to_string(), w.slot))
                .collect()
        };
        let before = slots(&p);
        let distinct: BTreeSet<u32> = before.values().copied().collect();
        assert_eq!(distinct, BTreeSet::from([0, 1, 2]));
        let list_now = |p: &mut Pool, ids: &[&str], at: u64| {
            let list = ids
                .iter()
                .map(|id| listed_record(p, id, SET, "run"))
                .collect();
            let threshold = p.stamp;
            p.listed(Timestamp(at), threshold, Ok(list));
        };
        list_now(&mut p, &["i-1", "i-3"], 2_000);
        assert_eq!(slots(&p).len(), 2, "i-2 is gone");
        list_now(&mut p, &["i-1", "i-3", "i-4"], 3_000);
        let after = slots(&p);
        assert_eq!(after.len(), 3, "{after:?}");
        assert_eq!(after["i-1"], before["i-1"]);
        assert_eq!(after["i-3"], before["i-3"]);
        assert_eq!(after["i-4"], before["i-2"], "the freed slot is reused");
    }

    /// A listing refreshes the same workers whatever its order: in ID order the merge places
    /// every record; out of order, records go through lookups. With records the workers hold,
    /// changed ones, new instances before, between and after the known ones, a duplicate, one
    /// of another instance set, and a known instance missing (gone).
    #[test]
    fn a_listing_in_any_order_refreshes_the_same_workers() {
        let ids = ["i-1", "i-2", "i-3", "i-4", "i-5", "i-6"];
        let outcome = |order: &[usize]| {
            let mut p = pool(&ids);
            let held = |p: &Pool, id: &str| Arc::clone(&p.workers[id].info);
            let twice = held(&p, "i-5");
            let records = vec![
                listed_record(&p, "i-0", SET, "run"),
                held(&p, "i-1"),
                listed_record(&p, "i-2", SET, "hold"),
                listed_record(&p, "i-25", SET, "run"),
                held(&p, "i-3"),
                listed_record(&p, "i-35", "other-set", "run"),
                Arc::clone(&twice),
                twice,
                held(&p, "i-6"),
                listed_record(&p, "i-9", SET, "run"),
            ];
            let list = order.iter().map(|&i| Arc::clone(&records[i])).collect();
            let threshold = p.stamp;
            p.listed(Timestamp(2_000), threshold, Ok(list));
            let workers: Vec<(String, InstanceInfo, bool)> = p
                .workers
                .values()
                .map(|w| (w.id.clone(), (*w.info).clone(), w.tags_busy))
                .collect();
            let mut calls: Vec<String> = p.cloud_queue.iter().map(|r| format!("{r:?}")).collect();
            calls.sort();
            (workers, calls)
        };
        let sorted: Vec<usize> = (0..10).collect();
        let (workers, calls) = outcome(&sorted);
        let listed: Vec<&str> = workers.iter().map(|(id, _, _)| id.as_str()).collect();
        assert_eq!(
            listed,
            ["i-0", "i-1", "i-2", "i-25", "i-3", "i-5", "i-6", "i-9"],
            "i-4 is gone; i-35 belongs to another set"
        );
        assert!(calls.contains(&"SetTags(\"i-2\")".to_string()), "{calls:?}");
        let mut rng = crate::core::rng::Rng::new(5);
        for round in 0..50 {
            let mut order = sorted.clone();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            assert_eq!(
                outcome(&order),
                (workers.clone(), calls.clone()),
                "round {round}: {order:?}"
            );
        }
    }

    /// The run probe's command, formatted once per pool, is the remote user's.
    #[test]
    fn the_run_probe_command_is_the_remote_users() {
        let p = pool(&[]);
        for user in ["root", "admin", "crunch", ""] {
            assert_eq!(
                p.list_commands[usize::from(remote::needs_sudo(user))],
                remote::list_command(&p.runner.command, user),
                "{user}"
            );
        }
    }

    #[test]
    fn the_quick_check_and_the_full_one_agree() {
        let ops = Ops::default();
        let mut p = pool(&["i-1", "i-2"]);
        assert_eq!(p.check(&ops), (vec![], true));

        // A runner the index does not know.
        worker(&mut p, "i-1")
            .running
            .insert(Key::new(U1), Runner::new(U1, Timestamp(1)));
        let (v, unique) = p.check(&ops);
        assert!(!unique);
        assert_eq!(
            v,
            [
                format!("runner {U1} on i-1 is not indexed to it"),
                "runner index has 0 entries but workers hold 1 runners".to_string(),
            ]
        );

        // Indexed to the other instance: as many runners as index entries, so only the
        // pairs' hash sums tell.
        let (slot1, slot2) = (p.workers["i-1"].slot, p.workers["i-2"].slot);
        assert_ne!(slot1, slot2, "each worker has its own slot");
        p.book.started(U1, "i-2", slot2);
        let (v, unique) = p.check(&ops);
        assert!(!unique);
        assert_eq!(v, [format!("runner {U1} on i-1 is not indexed to it")]);

        // Indexed to the right instance under another slot: the pass would not find it.
        p.book.started(U1, "i-1", slot2);
        let (v, unique) = p.check(&ops);
        assert!(!unique);
        assert_eq!(v, [format!("runner {U1} on i-1 is not indexed to it")]);

        // Indexed: consistent again.
        p.book.started(U1, "i-1", slot1);
        assert_eq!(p.check(&ops), (vec![], true));

        // The same container starting on a second instance: not indexed there, and the
        // counts differ; the dispatcher then looks for UUIDs on two instances.
        worker(&mut p, "i-2")
            .starting
            .insert(Key::new(U1), Runner::new(U1, Timestamp(1)));
        let (v, unique) = p.check(&ops);
        assert!(!unique);
        assert_eq!(
            v,
            [
                format!("runner {U1} on i-2 is not indexed to it"),
                "runner index has 1 entries but workers hold 2 runners".to_string(),
            ]
        );
        worker(&mut p, "i-2").starting.clear();

        // Starting and running on the same instance.
        worker(&mut p, "i-1")
            .starting
            .insert(Key::new(U1), Runner::new(U1, Timestamp(1)));
        let (v, unique) = p.check(&ops);
        assert!(!unique);
        assert!(
            v.contains(&format!("runner {U1} on i-1 is both starting and running")),
            "{v:?}"
        );
        worker(&mut p, "i-1").starting.clear();
        assert_eq!(p.check(&ops), (vec![], true));

        // An idle instance with a runner.
        worker(&mut p, "i-1").state = WorkerState::Idle;
        assert_eq!(
            p.check(&ops),
            (vec!["idle instance i-1 has runners".to_string()], false)
        );
    }
}
