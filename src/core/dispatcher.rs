//! `Dispatcher`: the sans-IO state machine that owns the queue, the pool and the scheduler.
//!
//! # Contract (the run loop every driver follows)
//!
//! ```text
//! let mut d = Dispatcher::new(config, options, now);
//! loop {
//!     while let Some(cmd) = d.poll_command() { execute(cmd) }   // drain after every call
//!     wait until d.poll_timeout() or a completion arrives;
//!     d.handle_input(now, input)  or  d.handle_timeout(now);
//! }
//! ```
//!
//! Time never goes backwards (asserted). Every command gets exactly one completion; a late,
//! duplicate or unknown one is logged and ignored. If an adapter never answers, the core gives
//! up at the command's deadline plus a grace period and treats the operation as failed.
//! Admin operations (hold/drain/run/kill instance, kill container) are calls too, followed by
//! the same drain.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::command::{
    ApiError, CloudError, CloudErrorKind, Command, CommandKind, ExecError, ExecErrorKind, Input,
    OpId,
};
use super::config::Config;
use super::key::Key;
use super::metrics::PoolMetrics;
use super::ops::{Ops, Pending};
use super::pool::remote::RunnerSpec;
use super::pool::{AdminError, ExecDone, Pool};
use super::queue::{Queue, QueueEntry};
use super::rng::Rng;
use super::scheduler::{
    self, Action, PlanInstance, PoolLimits, Rank, SchedState, Snapshot, Status,
};
use super::select::TypeTable;
use super::time::Timestamp;
use super::types::{ContainerState, IdleBehavior, InstanceView, WorkerState};

/// Re-run a pass this soon when a per-container operation was still in flight.
pub const UUID_CONTENTION_RETRY: Duration = Duration::from_millis(250);

/// What the dispatcher is told at construction, besides the config.
#[derive(Clone, Debug)]
pub struct Options {
    /// Root seed for the core's random stream (instance secrets, probe jitter).
    pub seed: u64,
    /// `<TagKeyPrefix>InstanceSetID` value (derived from the token by the caller).
    pub instance_set_id: String,
    /// How crunch-run is invoked and deployed.
    pub runner: RunnerSpec,
}

/// Scheduler gauges (reference-scheduler.md §6 Metrics).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedMetrics {
    /// `containers_allocated_not_started`.
    pub allocated_not_started: usize,
    /// `containers_not_allocated_over_quota`.
    pub not_allocated_over_quota: usize,
    /// `containers_longest_wait_time_seconds`.
    pub longest_wait_seconds: f64,
    /// `max_concurrent_containers`.
    pub max_concurrent_containers: usize,
    /// `last_503_time` (Unix seconds in production, 0 if never).
    pub last_503_time: f64,
    /// `at_quota`.
    pub at_quota: bool,
    /// Scheduling passes run.
    pub passes: u64,
}

/// One row of the published scheduler queue (`SchedQueueEnt`).
#[derive(Clone, Debug, PartialEq)]
pub struct QueueItem {
    /// The entry.
    pub entry: QueueEntry,
    /// Its scheduling status string.
    pub scheduling_status: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StalePhase {
    NotStarted,
    Waiting { deadline: Timestamp },
    Done,
}

/// The dispatcher core.
#[derive(Debug)]
pub struct Dispatcher {
    cfg: Arc<Config>,
    types: TypeTable,
    now: Timestamp,
    rng: Rng,
    ops: Ops,
    queue: Queue,
    pool: Pool,
    sched: SchedState,
    last_503: Timestamp,
    uuid_ops: BTreeMap<String, OpId>,
    poll_op: Option<OpId>,
    next_poll_at: Timestamp,
    queue_loaded: bool,
    stale: StalePhase,
    dirty: bool,
    last_pass: Option<Timestamp>,
    retry_at: Option<Timestamp>,
    /// Last pass's containers in UUID order, with their statuses and ranks (the scheduling
    /// order is by rank). UUIDs as keys (copied in place, without touching the records), in
    /// the queue's order, so that a pass copies them in one sweep; the management API (rare
    /// next to passes) sorts them by rank or looks one up by UUID.
    published: Vec<(Key, Status, Rank)>,
    metrics: SchedMetrics,
    ignored_completions: u64,
}

impl Dispatcher {
    /// A dispatcher that starts polling and listing at `now`.
    pub fn new(config: Config, options: Options, now: Timestamp) -> Dispatcher {
        let types = TypeTable::new(&config.instance_types);
        let cfg = Arc::new(config);
        let pool = Pool::new(
            cfg.clone(),
            types.clone(),
            options.runner,
            &options.instance_set_id,
            now,
        );
        let sched = SchedState::initial(
            cfg.cloud_vms.initial_quota_estimate,
            cfg.cloud_vms.max_instances,
        );
        Dispatcher {
            cfg,
            types,
            now,
            rng: Rng::derive(options.seed, "core"),
            ops: Ops::default(),
            queue: Queue::default(),
            pool,
            sched,
            last_503: Timestamp::ZERO,
            uuid_ops: BTreeMap::new(),
            poll_op: None,
            next_poll_at: now,
            queue_loaded: false,
            stale: StalePhase::NotStarted,
            dirty: false,
            last_pass: None,
            retry_at: None,
            published: Vec::new(),
            metrics: SchedMetrics {
                max_concurrent_containers: sched.max_containers,
                ..SchedMetrics::default()
            },
            ignored_completions: 0,
        }
    }

    // ----- getters ----------------------------------------------------------------------------

    /// The config.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The instance types, indexed.
    pub fn types(&self) -> &TypeTable {
        &self.types
    }

    /// The time of the last call.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// The container queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The worker pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// `Instances()`: workers and pending creates.
    pub fn instances(&self) -> Vec<InstanceView> {
        self.pool.instances()
    }

    /// The scheduler's queue as last published, in scheduling order. `None` before the first
    /// pass (the API then shows `"items": null`).
    pub fn scheduler_queue(&self) -> Option<Vec<QueueItem>> {
        self.last_pass?;
        Some(
            scheduler::in_scheduling_order(&self.published)
                .filter_map(|(uuid, st, _)| {
                    let e = self.queue.entries().get(uuid)?;
                    Some(QueueItem {
                        entry: e.clone(),
                        scheduling_status: st.text(e, &self.types),
                    })
                })
                .collect(),
        )
    }

    /// One container of the published queue.
    pub fn scheduler_queue_item(&self, uuid: &str) -> Option<QueueItem> {
        let i = self
            .published
            .binary_search_by(|(u, _, _)| u.as_str().cmp(uuid))
            .ok()?;
        let st = &self.published[i].1;
        let e = self.queue.get(uuid)?;
        Some(QueueItem {
            entry: e.clone(),
            scheduling_status: st.text(e, &self.types),
        })
    }

    /// Scheduler gauges.
    pub fn sched_metrics(&self) -> SchedMetrics {
        SchedMetrics {
            at_quota: self.pool.at_quota(self.now),
            ..self.metrics.clone()
        }
    }

    /// Pool counters and summaries.
    pub fn pool_metrics(&self) -> &PoolMetrics {
        &self.pool.metrics
    }

    /// Completions ignored as late, duplicate or unknown.
    pub fn ignored_completions(&self) -> u64 {
        self.ignored_completions
    }

    /// Operations in flight.
    pub fn ops_in_flight(&self) -> usize {
        self.ops.in_flight()
    }

    pub(crate) fn ops(&self) -> &Ops {
        &self.ops
    }

    pub(crate) fn uuid_ops(&self) -> &BTreeMap<String, OpId> {
        &self.uuid_ops
    }

    pub(crate) fn poll_op(&self) -> Option<OpId> {
        self.poll_op
    }

    // ----- outputs ----------------------------------------------------------------------------

    /// The next command to carry out.
    #[must_use]
    pub fn poll_command(&mut self) -> Option<Command> {
        self.ops.pop_command()
    }

    /// When to call `handle_timeout` next (if no input arrives first).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let poll = self.poll_op.is_none().then_some(self.next_poll_at);
        let stale = match self.stale {
            StalePhase::Waiting { deadline } => Some(deadline),
            _ => None,
        };
        let pass = self
            .last_pass
            .filter(|_| self.dirty)
            .map(|last| last + self.cfg.tuning.schedule_min_interval);
        [
            poll,
            self.pool.next_timeout(),
            self.ops.next_deadline(),
            stale,
            pass,
            self.retry_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|x| x.max(self.now))
    }

    // ----- inputs -----------------------------------------------------------------------------

    fn advance(&mut self, now: Timestamp) {
        assert!(
            now >= self.now,
            "time went backwards: {} after {}",
            now,
            self.now
        );
        self.now = now;
    }

    /// Handles one fact.
    pub fn handle_input(&mut self, now: Timestamp, input: Input) {
        self.advance(now);
        match input.op() {
            Some(op) => match self.ops.take(op) {
                Some((pending, issued)) => self.complete(now, op, pending, issued, input),
                None => {
                    self.ignored_completions += 1;
                    tracing::warn!(%op, "ignoring late or unknown completion");
                }
            },
            None => {
                if let Input::SshConnected { instance } = input {
                    self.pool.ssh_connected(now, &instance);
                }
            }
        }
        self.after_event(now);
    }

    /// Handles the passage of time.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.advance(now);
        for (op, pending, issued) in self.ops.expired(now) {
            tracing::warn!(%op, ?pending, "operation deadline passed; treating it as failed");
            let input = timeout_input(op, &pending);
            self.complete(now, op, pending, issued, input);
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            self.dirty = true;
        }
        if self.poll_op.is_none() && now >= self.next_poll_at {
            let tracked = self.queue.begin_poll(now);
            let op = self.ops.issue(
                now,
                self.cfg.tuning.api_call_timeout,
                Pending::Poll,
                CommandKind::PollQueue { tracked },
            );
            self.poll_op = Some(op);
        }
        self.pool.handle_timeout(now, &mut self.ops, &mut self.rng);
        self.after_event(now);
    }

    fn complete(
        &mut self,
        now: Timestamp,
        op: OpId,
        pending: Pending,
        issued: Timestamp,
        input: Input,
    ) {
        match (pending, input) {
            (Pending::Poll, Input::QueuePolled { result, .. }) => {
                self.poll_finished(now, issued, result)
            }
            (
                Pending::Lock(uuid) | Pending::Unlock(uuid) | Pending::Cancel(uuid),
                Input::ContainerUpdated { result, .. },
            ) => {
                self.uuid_ops.remove(&uuid);
                match result {
                    Ok(upd) => {
                        if let (_, Some(cancel)) = self.queue.apply_update(&uuid, &upd) {
                            self.cancel_unsatisfiable(now, cancel);
                        }
                        self.dirty = true;
                    }
                    Err(err) => self.api_failed(now, &uuid, &err),
                }
            }
            (Pending::CancelUnsatisfiable(uuid), Input::UnsatisfiableCancelled { result, .. }) => {
                self.uuid_ops.remove(&uuid);
                if let Err(err) = result {
                    self.api_failed(now, &uuid, &err);
                }
            }
            (Pending::Create(secret), Input::CreateFinished { result, .. }) => {
                self.pool.create_finished(now, &secret, result)
            }
            (Pending::Destroy(id), Input::DestroyFinished { result, .. }) => {
                self.pool.destroy_finished(&id, result)
            }
            (Pending::List { threshold }, Input::InstancesListed { result, .. }) => {
                self.pool.listed(now, threshold, result)
            }
            (Pending::SetTags(id), Input::TagsSet { result, .. }) => {
                self.pool.tags_set(&id, result)
            }
            (Pending::Exec(id, purpose), Input::ExecFinished { result, .. }) => {
                self.pool.exec_finished(
                    now,
                    &mut self.ops,
                    ExecDone {
                        op,
                        issued,
                        instance: id,
                        purpose,
                        result,
                    },
                )
            }
            (pending, input) => {
                self.ignored_completions += 1;
                tracing::warn!(%op, ?pending, input = ?std::mem::discriminant(&input),
                    "ignoring completion of the wrong kind");
            }
        }
    }

    fn api_failed(&mut self, now: Timestamp, uuid: &str, err: &ApiError) {
        if err.is_503() {
            self.last_503 = now;
            self.dirty = true;
        }
        tracing::warn!(container = %uuid, error = %err, "container API call failed");
    }

    fn poll_finished(
        &mut self,
        now: Timestamp,
        issued: Timestamp,
        result: Result<super::command::PollResult, ApiError>,
    ) {
        self.poll_op = None;
        let interval = self.cfg.cloud_vms.poll_interval;
        let took = now.since(issued);
        match result {
            Ok(res) => {
                let fx = self.queue.apply_poll(
                    now,
                    res,
                    &self.types,
                    &self.cfg.containers,
                    self.cfg.tuning.queue_entries_max,
                );
                for cancel in fx.cancel_unsatisfiable {
                    self.cancel_unsatisfiable(now, cancel);
                }
                self.queue_loaded = true;
                self.dirty = true;
                self.next_poll_at = now + interval.max(took);
            }
            Err(err) => {
                self.queue.poll_failed();
                if err.is_503() {
                    self.last_503 = now;
                }
                tracing::warn!(error = %err, "error getting list of containers");
                self.next_poll_at = if self.queue_loaded {
                    now + interval.max(took)
                } else {
                    now + (interval / 10).max(Duration::from_secs(1))
                };
            }
        }
    }

    fn cancel_unsatisfiable(
        &mut self,
        now: Timestamp,
        (uuid, state, message): (String, ContainerState, String),
    ) {
        self.issue_uuid_op(now, &uuid, |u| {
            (
                Pending::CancelUnsatisfiable(u.to_string()),
                CommandKind::CancelUnsatisfiable {
                    uuid: u.to_string(),
                    lock_first: state == ContainerState::Queued,
                    message,
                },
            )
        });
    }

    /// Issues a per-container API call unless one is in flight (then retry soon). Returns
    /// whether it was issued.
    fn issue_uuid_op(
        &mut self,
        now: Timestamp,
        uuid: &str,
        make: impl FnOnce(&str) -> (Pending, CommandKind),
    ) -> bool {
        if self.uuid_ops.contains_key(uuid) {
            let t = now + UUID_CONTENTION_RETRY;
            self.retry_at = Some(self.retry_at.map_or(t, |r| r.min(t)));
            return false;
        }
        let (pending, kind) = make(uuid);
        let op = self
            .ops
            .issue(now, self.cfg.tuning.api_call_timeout, pending, kind);
        self.uuid_ops.insert(uuid.to_string(), op);
        true
    }

    // ----- admin ------------------------------------------------------------------------------

    fn admin_behavior(
        &mut self,
        now: Timestamp,
        id: &str,
        b: IdleBehavior,
    ) -> Result<(), AdminError> {
        self.advance(now);
        let r = self.pool.set_idle_behavior(now, id, b);
        self.after_event(now);
        r
    }

    /// Sets idle behaviour `hold`.
    pub fn hold_instance(&mut self, now: Timestamp, id: &str) -> Result<(), AdminError> {
        self.admin_behavior(now, id, IdleBehavior::Hold)
    }

    /// Sets idle behaviour `drain`.
    pub fn drain_instance(&mut self, now: Timestamp, id: &str) -> Result<(), AdminError> {
        self.admin_behavior(now, id, IdleBehavior::Drain)
    }

    /// Sets idle behaviour `run`.
    pub fn run_instance(&mut self, now: Timestamp, id: &str) -> Result<(), AdminError> {
        self.admin_behavior(now, id, IdleBehavior::Run)
    }

    /// Destroys an instance now.
    pub fn kill_instance(
        &mut self,
        now: Timestamp,
        id: &str,
        reason: &str,
    ) -> Result<(), AdminError> {
        self.advance(now);
        let r = self.pool.kill_instance(now, id, reason);
        self.after_event(now);
        r
    }

    /// Sends SIGTERM to a container's crunch-run ("via management API: <reason>").
    pub fn kill_container(
        &mut self,
        now: Timestamp,
        uuid: &str,
        reason: &str,
    ) -> Result<(), AdminError> {
        self.advance(now);
        let ok = self.pool.kill_container(
            now,
            &mut self.ops,
            uuid,
            &format!("via management API: {reason}"),
        );
        self.after_event(now);
        if ok {
            Ok(())
        } else {
            Err(AdminError::ContainerNotFound)
        }
    }

    // ----- scheduling -------------------------------------------------------------------------

    fn after_event(&mut self, now: Timestamp) {
        if self.pool.take_changed() {
            self.dirty = true;
        }
        if !self.queue_loaded || !self.pool.loaded() {
            return;
        }
        if self.stale != StalePhase::Done {
            self.fix_stale_locks(now);
            if self.stale != StalePhase::Done {
                return;
            }
        }
        let due = self
            .last_pass
            .is_none_or(|last| now >= last + self.cfg.tuning.schedule_min_interval);
        if self.dirty && due {
            self.run_pass(now);
            // The pass's own effects (starts, creates) will be seen at the next event.
            if self.pool.take_changed() {
                self.dirty = true;
            }
        }
    }

    /// `fixStaleLocks` (§3.3), with B4 fixed: the stale set is recomputed when acting.
    fn fix_stale_locks(&mut self, now: Timestamp) {
        if self.stale == StalePhase::NotStarted {
            self.stale = if self.pool.any_unknown() {
                StalePhase::Waiting {
                    deadline: now + self.cfg.containers.stale_lock_timeout,
                }
            } else {
                StalePhase::Done
            };
        }
        let StalePhase::Waiting { deadline } = self.stale else {
            return;
        };
        let running = self.pool.running();
        let stale: Vec<String> = self
            .queue
            .entries()
            .iter()
            .filter(|(uuid, e)| e.state() == ContainerState::Locked && !running.contains_key(*uuid))
            .map(|(uuid, _)| uuid.to_string())
            .collect();
        if stale.is_empty() {
            self.stale = StalePhase::Done;
            return;
        }
        if self.pool.any_unknown() && now < deadline {
            return;
        }
        for uuid in stale {
            tracing::info!(container = %uuid, "unlocking stale lock");
            self.issue_uuid_op(now, &uuid, |u| {
                (
                    Pending::Unlock(u.to_string()),
                    CommandKind::Unlock {
                        uuid: u.to_string(),
                    },
                )
            });
        }
        self.stale = StalePhase::Done;
        self.dirty = true;
    }

    /// Runs one scheduling pass, `sync` and the metrics update now.
    pub fn run_pass(&mut self, now: Timestamp) {
        self.dirty = false;
        self.last_pass = Some(now);
        self.metrics.passes += 1;
        let instances = self.pool.plan_instances();
        // Go's `totalInstances`, the sum of `CountWorkers()`: every worker, in any state.
        let total = self.pool.workers().len();
        // The pass's actions start runners on idle or running workers and shut down idle or
        // booting ones: whether any worker is unknown stays as found here, for `sync`. (The
        // pass reads every instance's state next, so this loads nothing twice.)
        let any_unknown = instances.iter().any(|v| v.state() == WorkerState::Unknown);
        let (actions, state, hit_limit, alloc, overq, facts) = {
            let snap = Snapshot {
                types: &self.types,
                queue: self.queue.entries(),
                running: self.pool.running(),
                indexed: Some(self.pool.indexed()),
                instances: &instances,
                total_instances: total,
                pool: PoolLimits {
                    quota_error: self.pool.quota_error_active(now),
                    max_instances: self.cfg.cloud_vms.max_instances,
                    instance_count: self.pool.instance_count(),
                    creating: self.pool.creating_count(),
                    max_concurrent_creates: self.cfg.cloud_vms.max_concurrent_instance_create_ops,
                    create_blocked: self.pool.create_blocked(now),
                    capacity_blocked: self.pool.capacity_blocked(now),
                },
                state: self.sched,
                last_503: self.last_503,
                max_running_per_instance: self.cfg.cloud_vms.max_running_containers_per_instance,
                supervisor_fraction: self.cfg.cloud_vms.supervisor_fraction,
            };
            let plan = scheduler::plan(&snap, now);
            self.published.clear();
            self.published.extend(
                plan.entries
                    .iter()
                    .map(|&(uuid, st, rank)| (uuid.clone(), st, rank)),
            );
            (
                plan.actions,
                plan.state,
                plan.hit_create_limit,
                plan.allocated_not_started,
                plan.not_allocated_over_quota,
                OwnedSyncFacts::from(plan.sync),
            )
        };
        self.sched = state;
        self.metrics.allocated_not_started = alloc;
        self.metrics.not_allocated_over_quota = overq;
        self.metrics.max_concurrent_containers = state.max_containers;
        self.metrics.last_503_time = state.last_503_acted.as_secs_f64();
        for action in actions {
            self.apply(now, action);
        }
        if hit_limit {
            self.pool.create_limit_reached(now);
        }
        debug_assert_eq!(any_unknown, self.pool.any_unknown());
        let oldest = self.sync(now, any_unknown, facts);
        self.update_metrics(now, oldest);
    }

    fn apply(&mut self, now: Timestamp, action: Action) {
        match action {
            Action::Lock(uuid) => {
                if self
                    .queue
                    .get(&uuid)
                    .is_some_and(|e| e.state() == ContainerState::Queued)
                {
                    self.issue_uuid_op(now, &uuid, |u| {
                        (
                            Pending::Lock(u.to_string()),
                            CommandKind::Lock {
                                uuid: u.to_string(),
                            },
                        )
                    });
                }
            }
            Action::Start { instance, uuid } => {
                let ctr = self
                    .queue
                    .get(&uuid)
                    .expect("planned from the queue")
                    .container()
                    .clone();
                if !self
                    .pool
                    .start_container(now, &mut self.ops, &instance, &ctr)
                {
                    tracing::warn!(container = %uuid, %instance, "BUG? planned start was refused");
                }
            }
            Action::Create { type_id, uuid } => {
                if !self.pool.create(now, &mut self.rng, type_id) {
                    tracing::warn!(container = %uuid, instance_type = %self.types.get(type_id).name,
                        "BUG? planned create was refused");
                }
            }
            Action::Kill { uuid, reason } => {
                self.pool.kill_container(now, &mut self.ops, &uuid, reason);
            }
            Action::Unlock(uuid) => {
                self.issue_uuid_op(now, &uuid, |u| {
                    (
                        Pending::Unlock(u.to_string()),
                        CommandKind::Unlock {
                            uuid: u.to_string(),
                        },
                    )
                });
            }
            Action::Shutdown(id) => {
                self.pool.shutdown(now, &id);
            }
        }
    }

    fn kill(&mut self, now: Timestamp, uuid: &str, reason: &str) {
        self.pool.kill_container(now, &mut self.ops, uuid, reason);
        self.pool.forget_container(uuid);
    }

    fn cancel(&mut self, now: Timestamp, uuid: &str, reason: &str) {
        tracing::info!(container = %uuid, reason, "cancelling container");
        self.issue_uuid_op(now, uuid, |u| {
            (
                Pending::Cancel(u.to_string()),
                CommandKind::Cancel {
                    uuid: u.to_string(),
                },
            )
        });
    }

    fn requeue(&mut self, now: Timestamp, uuid: &str, reason: &str) {
        tracing::info!(container = %uuid, reason, "requeueing container");
        self.issue_uuid_op(now, uuid, |u| {
            (
                Pending::Unlock(u.to_string()),
                CommandKind::Unlock {
                    uuid: u.to_string(),
                },
            )
        });
    }

    /// `sync()` (§3.1): reconcile queue states with crunch-run processes. Decisions are made
    /// on one snapshot (queue entries and `Running()` as they are now), then applied in order.
    ///
    /// `facts` is what the pass's merge of the queue with `Running()` found (owned): the
    /// entries `sync` may act on, the strays, and the oldest other waiting entry. The pass's
    /// actions, made since, change neither the suspects' entries nor their `Running()`
    /// records; debug builds check the decisions against a walk of both.
    ///
    /// Returns the oldest waiting container's `created_at` after its actions, for
    /// [`Dispatcher::update_metrics`]. `any_unknown`: whether any worker is unknown.
    fn sync(
        &mut self,
        now: Timestamp,
        any_unknown: bool,
        facts: OwnedSyncFacts,
    ) -> Option<Timestamp> {
        let q_updated = self.queue.updated().unwrap_or(Timestamp::ZERO);
        let mut todo: Vec<(String, SyncAct)> = Vec::new();
        let mut oldest = facts.oldest_waiting;
        for (key, proc) in facts.suspects {
            // The pass's actions remove no entry; a walk would not see one that went.
            let Some(e) = self.queue.get(&key) else {
                continue;
            };
            match sync_act(e, proc, q_updated, any_unknown) {
                Some(a) => todo.push((key, a)),
                None if waiting(e, proc.is_some()) => {
                    let t = e.created_at();
                    oldest = Some(oldest.map_or(t, |o| o.min(t)));
                }
                None => {}
            }
        }
        let strays = facts.strays;
        if cfg!(debug_assertions) {
            let (walk_todo, walk_strays, walk_oldest) = self.sync_walk(q_updated, any_unknown);
            assert_eq!(
                (&todo, &strays, oldest),
                (&walk_todo, &walk_strays, walk_oldest),
                "the pass's merge finds what a walk of the queue and Running() finds"
            );
        }
        if todo.is_empty() && strays.is_empty() {
            return oldest;
        }
        for (uuid, act) in &todo {
            let uuid = uuid.as_str();
            match act {
                SyncAct::Cancel(reason) => self.cancel(now, uuid, reason),
                SyncAct::Kill(reason) => self.kill(now, uuid, reason),
                SyncAct::Requeue(reason) => self.requeue(now, uuid, reason),
                SyncAct::Forget => {
                    self.queue.forget(uuid);
                }
            }
        }
        for uuid in strays {
            self.kill(now, &uuid, "not in queue");
        }
        // Each action changes its own container's entry and `Running()` record only, and the
        // strays are not in the queue: only the entries acted on may have changed whether
        // they wait.
        let running = self.pool.running();
        for (uuid, _) in &todo {
            if let Some(e) = self.queue.get(uuid)
                && waiting(e, running.contains_key(uuid.as_str()))
            {
                let t = e.created_at();
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
        }
        oldest
    }

    /// What `sync` decides, by one merge of the queue with `Running()` (both in UUID order):
    /// the actions, the strays and the oldest waiting entry not acted on. Debug builds check
    /// the facts of the pass's merge against it.
    fn sync_walk(
        &self,
        q_updated: Timestamp,
        any_unknown: bool,
    ) -> (Vec<(String, SyncAct)>, Vec<String>, Option<Timestamp>) {
        let mut todo = Vec::new();
        let mut strays: Vec<String> = Vec::new();
        let mut oldest: Option<Timestamp> = None;
        let mut running = self.pool.running().iter().peekable();
        for (key, e) in self.queue.entries() {
            while let Some((u, _)) = running.next_if(|(u, _)| *u < key) {
                strays.push(u.to_string());
            }
            let proc = running.next_if(|(u, _)| *u == key).map(|(_, t)| *t);
            if let Some(a) = sync_act(e, proc, q_updated, any_unknown) {
                todo.push((key.to_string(), a));
            } else if waiting(e, proc.is_some()) {
                let t = e.created_at();
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
        }
        strays.extend(running.map(|(u, _)| u.to_string()));
        (todo, strays, oldest)
    }

    /// `updateMetrics()` (§3.2). `oldest` is the oldest waiting container's `created_at`, as
    /// [`Dispatcher::sync`] found it; debug builds check it against a walk of the queue.
    fn update_metrics(&mut self, now: Timestamp, oldest: Option<Timestamp>) {
        debug_assert_eq!(
            oldest,
            self.oldest_waiting(),
            "sync's oldest waiting container"
        );
        self.metrics.longest_wait_seconds = oldest.map_or(0.0, |t| now.since(t).as_secs_f64());
    }

    /// The oldest waiting container's `created_at`, by a walk of the queue. The queue and
    /// `Running()` are both in UUID order: merged rather than each entry looked up.
    fn oldest_waiting(&self) -> Option<Timestamp> {
        let mut running = self.pool.running().keys().peekable();
        self.queue
            .entries()
            .iter()
            .filter(|(key, e)| {
                while running.next_if(|u| *u < *key).is_some() {}
                waiting(e, running.next_if(|u| *u == *key).is_some())
            })
            .map(|(_, e)| e.created_at())
            .min()
    }
}

/// What `sync` does about one queue entry.
#[derive(Clone, Debug, PartialEq)]
enum SyncAct {
    Cancel(&'static str),
    Kill(String),
    Requeue(&'static str),
    Forget,
}

/// The pass's [`scheduler::SyncFacts`], owned, so that the pass's actions can be applied
/// before `sync` reads them.
struct OwnedSyncFacts {
    suspects: Vec<(String, Option<Option<Timestamp>>)>,
    strays: Vec<String>,
    oldest_waiting: Option<Timestamp>,
}

impl From<scheduler::SyncFacts<'_>> for OwnedSyncFacts {
    fn from(f: scheduler::SyncFacts<'_>) -> Self {
        OwnedSyncFacts {
            suspects: f
                .suspects
                .into_iter()
                .map(|(k, p)| (k.to_string(), p))
                .collect(),
            strays: f.strays.into_iter().map(str::to_string).collect(),
            oldest_waiting: f.oldest_waiting,
        }
    }
}

/// `sync`'s decision for the entry `e` with `Running()` entry `proc` (`None`: none;
/// `Some(None)`: a live runner; `Some(Some(t))`: exited at `t`), given when the last poll
/// began and whether any worker is unknown.
fn sync_act(
    e: &QueueEntry,
    proc: Option<Option<Timestamp>>,
    q_updated: Timestamp,
    any_unknown: bool,
) -> Option<SyncAct> {
    let (state, priority) = (e.state(), e.priority());
    let exited_before_poll = matches!(proc, Some(Some(t)) if q_updated > t);
    match state {
        ContainerState::Running => {
            if proc.is_none() {
                (!any_unknown).then_some(SyncAct::Cancel("not running on any worker"))
            } else if exited_before_poll {
                Some(SyncAct::Cancel("state=Running after crunch-run exited"))
            } else if priority == 0 {
                Some(SyncAct::Kill("priority=0".into()))
            } else {
                None
            }
        }
        ContainerState::Complete | ContainerState::Cancelled => {
            if proc.is_some() {
                Some(SyncAct::Kill(format!("state={state}")))
            } else {
                Some(SyncAct::Forget)
            }
        }
        ContainerState::Queued => {
            if proc.is_some() {
                Some(SyncAct::Kill(
                    "pool says running, but queue says state=Queued".into(),
                ))
            } else if priority == 0 {
                Some(SyncAct::Forget)
            } else {
                None
            }
        }
        ContainerState::Locked => {
            if exited_before_poll {
                Some(SyncAct::Requeue("crunch-run exited"))
            } else if matches!(proc, Some(None)) && priority == 0 {
                Some(SyncAct::Kill("priority=0".into()))
            } else if proc.is_none() && priority == 0 {
                Some(SyncAct::Requeue("priority=0"))
            } else {
                None
            }
        }
    }
}

/// Whether `e` counts as waiting for the longest-wait gauge: wanted (priority > 0), Queued
/// or Locked, and with no runner or exit record in `Running()`.
fn waiting(e: &QueueEntry, in_running: bool) -> bool {
    e.priority() > 0
        && matches!(e.state(), ContainerState::Queued | ContainerState::Locked)
        && !in_running
}

/// The failure the core records for an operation whose deadline passed.
fn timeout_input(op: OpId, pending: &Pending) -> Input {
    let msg = "deadline exceeded (no completion from the adapter)".to_string();
    let api = || ApiError {
        status: None,
        message: msg.clone(),
    };
    let cloud = || CloudError {
        kind: CloudErrorKind::Transient,
        message: msg.clone(),
    };
    match pending {
        Pending::Poll => Input::QueuePolled {
            op,
            result: Err(api()),
        },
        Pending::Lock(_) | Pending::Unlock(_) | Pending::Cancel(_) => Input::ContainerUpdated {
            op,
            result: Err(api()),
        },
        Pending::CancelUnsatisfiable(_) => Input::UnsatisfiableCancelled {
            op,
            result: Err(api()),
        },
        Pending::Create(_) => Input::CreateFinished {
            op,
            result: Err(cloud()),
        },
        Pending::Destroy(_) => Input::DestroyFinished {
            op,
            result: Err(cloud()),
        },
        Pending::List { .. } => Input::InstancesListed {
            op,
            result: Err(cloud()),
        },
        Pending::SetTags(_) => Input::TagsSet {
            op,
            result: Err(cloud()),
        },
        Pending::Exec(..) => Input::ExecFinished {
            op,
            result: Err(ExecError {
                kind: ExecErrorKind::Timeout,
                stdout: String::new(),
                stderr: String::new(),
                message: msg.clone(),
            }),
        },
    }
}
