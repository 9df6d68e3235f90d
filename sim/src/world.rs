//! The world: virtual time, the event heap, and the routing of the core's commands to the
//! simulated controller, cloud and VMs.
//!
//! Events are ordered by (time, sequence); the sequence is assigned at scheduling time, so the
//! order is total and the run is a pure function of the scenario and the seed. There are no
//! threads, no sleeping and no wall clock. Every input delivered to the dispatcher, every command
//! it emits and every timer firing becomes one line of the canonical event log, hashed with
//! FNV-1a; the same seed gives the same log byte for byte.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io::Write;
use std::time::Duration;

use arvados_dispatch_cloud::config::Loaded;
use arvados_dispatch_cloud::core::command::{ApiError, Command, CommandKind, Input, PollResult};
use arvados_dispatch_cloud::core::key::Key;
use arvados_dispatch_cloud::core::metrics::PoolMetrics;
use arvados_dispatch_cloud::core::pool::remote::RunnerSpec;
use arvados_dispatch_cloud::core::rng::Rng;
use arvados_dispatch_cloud::core::time::millis;
use arvados_dispatch_cloud::core::types::ContainerState;
use arvados_dispatch_cloud::core::{Dispatcher, Options, Timestamp};

use crate::api::Controller;
use crate::check::Checker;
use crate::cloud::{Cloud, NEVER};
use crate::log::EventLog;
use crate::scenario::Scenario;
use crate::workload::{Submission, from_shape};

/// The InstanceSetID of the simulated dispatcher.
pub const INSTANCE_SET_ID: &str = "zzzzz-gj3su-dispatchersimul0";

/// Hard bound on steps, whatever the scenario says.
pub const STEPS_MAX: u64 = 2_000_000_000;

#[derive(Debug)]
enum Ev {
    /// A completion for dispatcher generation `gen`. Boxed: an `Input` is 160 bytes, the
    /// other events at most 72, and every event is copied into and out of the slab.
    Deliver { generation: u32, input: Box<Input> },
    /// The dispatcher asked to be woken (`gen`, timer number).
    Timer { generation: u32, n: u64 },
    /// Workload submission number `i`.
    Arrive(usize),
    /// crunch-run finished setting up; the container goes Running.
    Setup { inst: Key, uuid: Key, token: u64 },
    /// crunch-run exits (payload done, or crash).
    Exit {
        inst: Key,
        uuid: Key,
        token: u64,
        crash: bool,
    },
    /// The user cancels a container.
    UserCancel(Key),
    /// A workflow supervisor submits child `n`.
    Child { parent: Key, n: usize },
    /// The cloud warns that it will reclaim a spot instance (logged; crunch-run would see it in
    /// the instance metadata).
    ReclaimNotice(Key),
    /// The cloud reclaims a spot instance.
    Reclaim(Key),
    /// The dispatcher restarts.
    Restart,
}

/// An event's heap key: its time (the high 64 bits), its sequence number (the next 40) and
/// its slab slot (the low 24), so that comparing keys compares `(time, sequence)` (unique; the
/// slot never decides). Sequence numbers and slots that do not fit are refused loudly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct HeapKey(u128);

impl HeapKey {
    const SLOT_BITS: u32 = 24;
    const SEQ_BITS: u32 = 40;

    fn new(at: u64, seq: u64, slot: u32) -> HeapKey {
        assert!(
            seq >> Self::SEQ_BITS == 0 && slot >> Self::SLOT_BITS == 0,
            "event {seq} in slot {slot}: at most 2^40 events and 2^24 pending ones"
        );
        HeapKey((u128::from(at) << 64) | (u128::from(seq) << Self::SLOT_BITS) | u128::from(slot))
    }

    fn at(self) -> u64 {
        (self.0 >> 64) as u64
    }

    fn seq(self) -> u64 {
        (self.0 >> Self::SLOT_BITS) as u64 & ((1 << Self::SEQ_BITS) - 1)
    }

    fn slot(self) -> u32 {
        (self.0 as u32) & ((1 << Self::SLOT_BITS) - 1)
    }
}

/// The event queue: `(time, sequence, slot)` keys in a binary heap, the events themselves in a
/// slab, plus a batch of events known in advance (the workload's arrivals), sorted once by
/// `(time, sequence)` and consumed from the front. A key is packed into one `u128` (see
/// [`HeapKey`]), so sifting compares two words and moves 16 bytes (an `Ev` is much larger);
/// keeping the arrivals (up to the whole workload) out of the heap keeps it as small as the
/// events actually in flight. The next event is the smaller of the heap's top and the batch's
/// front by `(time, sequence)`, which is unique, so the order is exactly that of one heap
/// holding everything.
#[derive(Default)]
struct Events {
    heap: BinaryHeap<Reverse<HeapKey>>,
    slab: Vec<Option<Ev>>,
    free: Vec<u32>,
    batch: VecDeque<(u64, u64, Ev)>,
    seq: u64,
}

impl Events {
    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(ev);
                i
            }
            None => {
                self.slab.push(Some(ev));
                u32::try_from(self.slab.len() - 1).expect("fewer than 2^32 pending events")
            }
        };
        self.heap.push(Reverse(HeapKey::new(at, self.seq, slot)));
    }

    /// Queues `events` as successive [`Events::push`] calls would (the same sequence numbers,
    /// so the same order), into the batch. Only once, before any other event.
    fn push_batch(&mut self, events: impl IntoIterator<Item = (u64, Ev)>) {
        assert!(
            self.seq == 0 && self.batch.is_empty(),
            "the batch comes before any other event"
        );
        let mut batch: Vec<(u64, u64, Ev)> = events
            .into_iter()
            .map(|(at, ev)| {
                self.seq += 1;
                (at, self.seq, ev)
            })
            .collect();
        // Sequence numbers grow along the vector, so a stable sort by time orders it by
        // (time, sequence).
        batch.sort_by_key(|&(at, _, _)| at);
        self.batch = batch.into();
    }

    /// Whether the batch's front comes before the heap's top.
    fn batch_first(&self) -> bool {
        match (self.batch.front(), self.heap.peek()) {
            (Some(&(at, seq, _)), Some(Reverse(k))) => (at, seq) < (k.at(), k.seq()),
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// The time of the next event.
    fn peek_at(&self) -> Option<u64> {
        if self.batch_first() {
            return self.batch.front().map(|&(at, _, _)| at);
        }
        self.heap.peek().map(|Reverse(k)| k.at())
    }

    /// The next event and its time.
    fn pop(&mut self) -> Option<(u64, Ev)> {
        if self.batch_first() {
            return self.batch.pop_front().map(|(at, _, ev)| (at, ev));
        }
        let Reverse(k) = self.heap.pop()?;
        let (at, slot) = (k.at(), k.slot());
        self.free.push(slot);
        let ev = self.slab[slot as usize]
            .take()
            .expect("a queued slot holds its event");
        Some((at, ev))
    }

    /// Every pending event, in no particular order.
    fn iter(&self) -> impl Iterator<Item = &Ev> {
        self.heap
            .iter()
            .filter_map(|Reverse(k)| self.slab[k.slot() as usize].as_ref())
            .chain(self.batch.iter().map(|(_, _, ev)| ev))
    }
}

/// Per-container facts the simulator tracks for workflows and payloads.
#[derive(Clone, Debug)]
struct Payload {
    runtime: Duration,
    workflow: Option<crate::scenario::WorkflowSpec>,
    children_left: usize,
    children_total: usize,
    parent: Option<Key>,
}

/// Streams of randomness, one per consumer.
struct Streams {
    cloud: Rng,
    api: Rng,
    vm: Rng,
    workload: Rng,
}

/// Run-time totals the report needs.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Events processed.
    pub events: u64,
    /// Pool metrics summed over dispatcher generations.
    pub pool: PoolMetrics,
    /// Highest `max_concurrent_containers` seen.
    pub max_concurrent_seen: usize,
    /// Whether `last_503_time` was ever non-zero.
    pub saw_503: bool,
    /// Whether `containers_not_allocated_over_quota` was ever non-zero.
    pub saw_over_quota: bool,
    /// Scheduling passes.
    pub passes: u64,
    /// Completions the cores ignored as late or unknown.
    pub ignored_completions: u64,
    /// Dispatcher restarts done.
    pub restarts: usize,
}

/// The simulation.
pub struct World {
    /// The scenario.
    pub scenario: Scenario,
    /// The loaded cluster config.
    pub loaded: Loaded,
    /// Root seed.
    pub seed: u64,
    /// Virtual now, ms.
    pub now: u64,
    events: Events,
    /// The dispatcher under test.
    pub d: Dispatcher,
    generation: u32,
    timer_n: u64,
    timer_at: Option<u64>,
    /// The controller.
    pub api: Controller,
    /// The cloud.
    pub cloud: Cloud,
    rng: Streams,
    submissions: Vec<Submission>,
    /// By container UUID (kept in the nodes, see [`Key`]).
    payloads: BTreeMap<Key, Payload>,
    next_uuid: u64,
    next_token: u64,
    /// The event log.
    pub log: EventLog,
    /// Ground-truth checks.
    pub checker: Checker,
    /// Totals.
    pub totals: Totals,
    /// Check the core's invariants every this many steps (1 = every step).
    pub check_every: u64,
    ended_all_at: Option<u64>,
    end: u64,
    /// External mode (see [`World::new_external`]): the completions of routed commands, kept
    /// here for the caller instead of entering the event heap.
    outbox: Option<Vec<(u64, Input)>>,
}

/// Why a world could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WorldError(pub String);

impl World {
    /// Builds the world for `scenario` (whose file lives in `dir`) with `seed`.
    pub fn new(
        scenario: Scenario,
        dir: &std::path::Path,
        seed: u64,
        log_out: Option<Box<dyn Write>>,
    ) -> Result<World, WorldError> {
        World::build(scenario, dir, seed, log_out, false)
    }

    fn build(
        scenario: Scenario,
        dir: &std::path::Path,
        seed: u64,
        log_out: Option<Box<dyn Write>>,
        external: bool,
    ) -> Result<World, WorldError> {
        let text = serde_yaml::to_string(&scenario.config)
            .map_err(|e| WorldError(format!("config: {e}")))?;
        let mut loaded = arvados_dispatch_cloud::config::load_str(&text, "config")
            .map_err(|e| WorldError(format!("config: {e}")))?;
        if let Some(d) = scenario.tuning.schedule_min_interval {
            loaded.core.tuning.schedule_min_interval = d.0;
        }
        let mut workload_rng = Rng::derive(seed, "workload");
        let mut submissions = crate::workload::expand(&scenario.workload, dir, &mut workload_rng)
            .map_err(|e| WorldError(e.to_string()))?;
        let cluster = loaded.core.cluster_id.clone();
        let max_attempts = scenario
            .controller
            .max_dispatch_attempts
            .unwrap_or(loaded.core.containers.max_dispatch_attempts);
        let mut w = World {
            api: Controller::new(max_attempts, scenario.controller.outages.clone()),
            cloud: Cloud::new(scenario.cloud.clone()),
            d: new_dispatcher(&loaded, seed, 0, 0),
            generation: 0,
            timer_n: 0,
            timer_at: None,
            seed,
            now: 0,
            events: Events::default(),
            rng: Streams {
                cloud: Rng::derive(seed, "cloud"),
                api: Rng::derive(seed, "api"),
                vm: Rng::derive(seed, "vm"),
                workload: workload_rng,
            },
            submissions: Vec::new(),
            payloads: BTreeMap::new(),
            next_uuid: 0,
            next_token: 0,
            log: EventLog::new(log_out),
            checker: Checker::default(),
            totals: Totals::default(),
            check_every: scenario.check_every.max(1),
            ended_all_at: None,
            end: millis(scenario.duration.0),
            outbox: None,
            loaded,
            scenario,
        };
        for s in submissions.iter_mut() {
            w.next_uuid += 1;
            s.container.uuid = container_uuid(&cluster, w.next_uuid).into();
        }
        w.events.push_batch(
            submissions
                .iter()
                .enumerate()
                .map(|(i, s)| (s.at, Ev::Arrive(i))),
        );
        w.submissions = submissions;
        for r in w.scenario.restarts.clone() {
            w.push(millis(r.0), Ev::Restart);
        }
        if external {
            w.outbox = Some(Vec::new());
        } else {
            w.d.handle_timeout(Timestamp(0));
            w.after_core();
        }
        Ok(w)
    }

    /// Builds the world in external mode: the dispatcher under test lives outside (the
    /// production shell under tokio's paused clock) and drives the models through
    /// [`World::route_external`] and [`World::advance_external`]. The world's own dispatcher
    /// never runs. Scenarios with restarts are refused, because restarting is the caller's job.
    pub fn new_external(
        scenario: Scenario,
        dir: &std::path::Path,
        seed: u64,
        log_out: Option<Box<dyn Write>>,
    ) -> Result<World, WorldError> {
        if !scenario.restarts.is_empty() {
            return Err(WorldError(format!(
                "scenario {:?} has {} restarts, which an external dispatcher must do itself",
                scenario.name,
                scenario.restarts.len()
            )));
        }
        World::build(scenario, dir, seed, log_out, true)
    }

    /// External mode: routes `cmd` to the models at virtual time `now` (ms) exactly as the
    /// world's own loop does, and returns its completions with their due times, in order.
    pub fn route_external(&mut self, now: u64, cmd: Command) -> Vec<(u64, Input)> {
        assert!(
            self.outbox.is_some(),
            "route_external needs World::new_external"
        );
        self.now = self.now.max(now);
        self.route(cmd);
        self.outbox.replace(Vec::new()).unwrap_or_default()
    }

    /// External mode: the time of the next world event (an arrival, crunch-run progress, a
    /// reclaim, a user cancel), if any.
    pub fn next_event_at(&self) -> Option<u64> {
        self.events.peek_at()
    }

    /// External mode: handles every world event due at or before `now` (ms), in order.
    pub fn advance_external(&mut self, now: u64) {
        assert!(
            self.outbox.is_some(),
            "advance_external needs World::new_external"
        );
        while self.events.peek_at().is_some_and(|at| at <= now) {
            let Some((at, ev)) = self.events.pop() else {
                break;
            };
            self.now = self.now.max(at);
            self.totals.events += 1;
            self.handle(ev);
        }
        self.now = self.now.max(now);
    }

    /// When the last container ended after every arrival, if that has happened.
    pub fn ended_all_at(&self) -> Option<u64> {
        self.ended_all_at
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.events.push(at, ev);
    }

    fn deliver(&mut self, at: u64, input: Input) {
        if let Some(out) = self.outbox.as_mut() {
            out.push((at, input));
            return;
        }
        let generation = self.generation;
        self.push(
            at,
            Ev::Deliver {
                generation,
                input: Box::new(input),
            },
        );
    }

    /// Routes the dispatcher's commands and re-arms its timer.
    fn after_core(&mut self) {
        while let Some(cmd) = self.d.poll_command() {
            if let CommandKind::PollQueue { tracked } = &cmd.kind {
                // The poll counts the log line's unfinished records as it goes (routing a
                // poll logs nothing else, so the line may follow it).
                let (at, result, missing) = self.route_poll(tracked);
                let missing = missing.unwrap_or_else(|| {
                    arvados_dispatch_cloud::core::command::poll_missing(tracked).count()
                });
                self.log
                    .poll_command(self.now, cmd.op.0, tracked.len(), missing);
                self.deliver(at, Input::QueuePolled { op: cmd.op, result });
                continue;
            }
            self.log.command(self.now, &cmd);
            self.route(cmd);
        }
        if let Some(t) = self.d.poll_timeout() {
            let t = t.0.max(self.now);
            if self.timer_at.is_none_or(|cur| t < cur || cur < self.now) {
                self.timer_n += 1;
                self.timer_at = Some(t);
                let (generation, n) = (self.generation, self.timer_n);
                self.push(t, Ev::Timer { generation, n });
            }
        }
        let s = self.d.sched_metrics();
        self.totals.max_concurrent_seen = self
            .totals
            .max_concurrent_seen
            .max(s.max_concurrent_containers);
        self.totals.saw_503 |= s.last_503_time > 0.0;
        self.totals.saw_over_quota |= s.not_allocated_over_quota > 0;
    }

    fn api_latency(&mut self) -> u64 {
        millis(
            self.scenario
                .controller
                .request_latency
                .draw(&mut self.rng.api),
        )
    }

    /// A poll's delivery time and result, and how many tracked records are unfinished if
    /// the poll counted them (see [`Controller::poll`]).
    fn route_poll(
        &mut self,
        tracked: &[arvados_dispatch_cloud::core::command::Tracked],
    ) -> (u64, Result<PollResult, ApiError>, Option<usize>) {
        let now = self.now;
        let at = now + self.api_latency();
        let (result, missing) = self.api.poll(now, tracked);
        (at, result, missing)
    }

    fn route(&mut self, cmd: Command) {
        let now = self.now;
        let op = cmd.op;
        match cmd.kind {
            CommandKind::PollQueue { tracked } => {
                let (at, result, _) = self.route_poll(&tracked);
                self.deliver(at, Input::QueuePolled { op, result });
            }
            CommandKind::Lock { uuid } => {
                let at = now + self.api_latency();
                let result = self.api.lock(now, &Key::new(&uuid));
                self.deliver(at, Input::ContainerUpdated { op, result });
            }
            CommandKind::Unlock { uuid } => {
                let at = now + self.api_latency();
                let result = self.api.unlock(now, &Key::new(&uuid));
                self.deliver(at, Input::ContainerUpdated { op, result });
            }
            CommandKind::Cancel { uuid } => {
                let at = now + self.api_latency();
                let result = self.api.cancel(now, &Key::new(&uuid));
                self.deliver(at, Input::ContainerUpdated { op, result });
            }
            CommandKind::CancelUnsatisfiable { uuid, message, .. } => {
                let at = now + 3 * self.api_latency();
                let result = self
                    .api
                    .cancel_unsatisfiable(now, &Key::new(&uuid), &message);
                self.deliver(at, Input::UnsatisfiableCancelled { op, result });
            }
            CommandKind::Create {
                instance_type,
                tags,
                ..
            } => {
                let done =
                    now + millis(self.scenario.cloud.create_latency.draw(&mut self.rng.cloud));
                let (result, reclaim) =
                    self.cloud
                        .create(now, done, &instance_type, tags, &mut self.rng.cloud);
                let max = self.loaded.core.cloud_vms.max_instances;
                if max > 0 && self.cloud.instances.len() > max {
                    self.checker.violation(
                        now,
                        format!(
                            "the cloud has {} instances, more than MaxInstances {max}",
                            self.cloud.instances.len()
                        ),
                    );
                }
                if let (Ok(info), Some(t)) = (&result, reclaim) {
                    let notice = t
                        .saturating_sub(millis(self.scenario.cloud.spot_notice.0))
                        .max(done);
                    self.push(notice, Ev::ReclaimNotice(Key::new(&info.id)));
                    self.push(t, Ev::Reclaim(Key::new(&info.id)));
                }
                self.deliver(done, Input::CreateFinished { op, result });
            }
            CommandKind::Destroy { instance } => {
                let at = now
                    + millis(
                        self.scenario
                            .cloud
                            .destroy_latency
                            .draw(&mut self.rng.cloud),
                    );
                let result = self.cloud.destroy(now, &instance, &mut self.rng.cloud);
                if let Ok(procs) = &result {
                    for uuid in procs {
                        self.checker.proc_stopped(uuid);
                    }
                }
                self.deliver(
                    at,
                    Input::DestroyFinished {
                        op,
                        result: result.map(|_| ()),
                    },
                );
            }
            CommandKind::ListInstances { tags } => {
                let at = now + millis(self.scenario.cloud.list_latency.draw(&mut self.rng.cloud));
                let result = self.cloud.list(now, &tags);
                self.deliver(at, Input::InstancesListed { op, result });
            }
            CommandKind::SetTags { instance, tags } => {
                let at = now
                    + millis(
                        self.scenario
                            .cloud
                            .set_tags_latency
                            .draw(&mut self.rng.cloud),
                    );
                let result = self.cloud.set_tags(&instance, tags);
                self.deliver(at, Input::TagsSet { op, result });
            }
            CommandKind::Exec {
                instance, command, ..
            } => {
                let at = now + millis(self.scenario.vms.command_latency.draw(&mut self.rng.vm));
                self.next_token += 1;
                let token = self.next_token;
                let ignore_term = self.rng.vm.unit_f64() < self.scenario.vms.ignore_term_rate;
                let id = Key::new(&instance);
                let Some(inst) = self.cloud.instances.get_mut(&id) else {
                    let result = Err(arvados_dispatch_cloud::core::command::ExecError {
                        kind: arvados_dispatch_cloud::core::command::ExecErrorKind::Connect,
                        stdout: String::new(),
                        stderr: String::new(),
                        message: "dial tcp: connection refused (instance gone)".into(),
                    });
                    self.deliver(at, Input::ExecFinished { op, result });
                    return;
                };
                let (result, fx) = inst.exec(now, &command, token, ignore_term);
                if fx.ssh_connected {
                    self.deliver(
                        at,
                        Input::SshConnected {
                            instance: instance.clone(),
                        },
                    );
                }
                if let Some((uuid, token)) = fx.started {
                    self.proc_started(id, uuid, token);
                }
                if let Some(uuid) = fx.killed {
                    self.checker.proc_stopped(&uuid);
                    if self
                        .api
                        .rows
                        .get(&uuid)
                        .is_some_and(|r| r.c.state == ContainerState::Running)
                    {
                        self.api.set_state(
                            now,
                            &uuid,
                            ContainerState::Cancelled,
                            "killed by dispatcher (SIGTERM)",
                        );
                        self.container_ended(&uuid);
                    }
                }
                self.deliver(at, Input::ExecFinished { op, result });
            }
        }
    }

    fn proc_started(&mut self, inst: Key, uuid: Key, token: u64) {
        let now = self.now;
        if let Some(other) = self.checker.proc_started(&uuid, &inst) {
            self.checker.violation(
                now,
                format!("container {uuid} runs on {inst} while still running on {other}"),
            );
        }
        let vm = &self.scenario.vms;
        let setup = millis(vm.setup_time.draw(&mut self.rng.vm));
        let crash = self.rng.vm.unit_f64() < vm.crash_rate;
        let early = crash && self.rng.vm.unit_f64() < 0.5;
        if early {
            let at = now + self.rng.vm.below(setup.max(1) + 1);
            self.push(
                at,
                Ev::Exit {
                    inst,
                    uuid,
                    token,
                    crash: true,
                },
            );
            return;
        }
        self.push(now + setup, Ev::Setup { inst, uuid, token });
    }

    fn container_ended(&mut self, uuid: &Key) {
        if self.api.open == 0 && self.ended_all_at.is_none() && self.arrivals_done() {
            self.ended_all_at = Some(self.now);
        }
        // A workflow child ending may end its supervisor.
        let Some(parent) = self.payloads.get(uuid).and_then(|p| p.parent.clone()) else {
            return;
        };
        let Some(pp) = self.payloads.get_mut(&parent) else {
            return;
        };
        pp.children_left = pp.children_left.saturating_sub(1);
        if pp.children_left == 0
            && self
                .api
                .rows
                .get(&parent)
                .is_some_and(|r| r.c.state == ContainerState::Running)
        {
            // The supervisor finishes once its children are done.
            if let Some((inst, token)) = self.find_proc(&parent) {
                self.push(
                    self.now + 1000,
                    Ev::Exit {
                        inst,
                        uuid: parent,
                        token,
                        crash: false,
                    },
                );
            }
        }
    }

    fn find_proc(&self, uuid: &Key) -> Option<(Key, u64)> {
        self.cloud.instances.iter().find_map(|(id, i)| {
            i.procs
                .get(uuid)
                .filter(|p| !p.exited)
                .map(|p| (id.clone(), p.token))
        })
    }

    fn arrivals_done(&self) -> bool {
        !self
            .events
            .iter()
            .any(|ev| matches!(ev, Ev::Arrive(_) | Ev::Child { .. }))
    }

    fn submit(&mut self, mut s: Submission, parent: Option<Key>) {
        let uuid = s.container.uuid.clone();
        if let Some(after) = s.cancel_after {
            self.push(self.now + millis(after), Ev::UserCancel(uuid.clone()));
        }
        let children = s
            .workflow
            .as_ref()
            .map(|w| w.children.sample(&mut self.rng.workload).round() as usize)
            .unwrap_or(0);
        self.payloads.insert(
            uuid,
            Payload {
                runtime: s.runtime,
                workflow: s.workflow.take(),
                children_left: children,
                children_total: children,
                parent,
            },
        );
        self.checker.submitted += 1;
        self.api.submit(self.now, s.container);
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Deliver { generation, input } => {
                if generation != self.generation {
                    return;
                }
                self.log.input(now, &input);
                self.d.handle_input(Timestamp(now), *input);
                self.after_core();
            }
            Ev::Timer { generation, n } => {
                if generation != self.generation || n != self.timer_n {
                    return;
                }
                self.timer_at = None;
                self.log.timer(now);
                self.d.handle_timeout(Timestamp(now));
                self.after_core();
            }
            Ev::Arrive(i) => {
                let s = self.submissions[i].clone();
                self.log.line(now, &format!("A {}", s.container.uuid));
                self.submit(s, None);
            }
            Ev::Setup { inst, uuid, token } => {
                let alive = self.cloud.instances.get(&inst).is_some_and(|i| {
                    i.procs
                        .get(&uuid)
                        .is_some_and(|p| p.token == token && !p.exited)
                });
                if !alive {
                    return;
                }
                if self.api.set_state(now, &uuid, ContainerState::Running, "") {
                    self.checker.payload_started(now, &uuid);
                    let p = self.payloads.get(&uuid).cloned();
                    match p.as_ref().and_then(|p| p.workflow.clone()) {
                        Some(wf) if p.as_ref().is_some_and(|p| p.children_total > 0) => {
                            let mut t = now;
                            for n in 0..p.as_ref().map_or(0, |p| p.children_total) {
                                t += millis(wf.child_interval.draw(&mut self.rng.workload));
                                self.push(
                                    t,
                                    Ev::Child {
                                        parent: uuid.clone(),
                                        n,
                                    },
                                );
                            }
                        }
                        _ => {
                            let crash_late =
                                self.rng.vm.unit_f64() < self.scenario.vms.crash_rate / 2.0;
                            let runtime = p.map_or(Duration::ZERO, |p| p.runtime);
                            let at = if crash_late {
                                now + millis(runtime) / 2
                            } else {
                                now + millis(runtime)
                            };
                            self.push(
                                at,
                                Ev::Exit {
                                    inst,
                                    uuid,
                                    token,
                                    crash: crash_late,
                                },
                            );
                        }
                    }
                } else {
                    // The container is no longer Locked (requeued or cancelled): crunch-run gives up.
                    self.push(
                        now,
                        Ev::Exit {
                            inst,
                            uuid,
                            token,
                            crash: true,
                        },
                    );
                }
            }
            Ev::Exit {
                inst,
                uuid,
                token,
                crash,
            } => {
                let stale = if self.rng.vm.unit_f64() < self.scenario.vms.stale_deadlock_rate {
                    NEVER
                } else {
                    let lag = millis(self.scenario.vms.stale_lag.draw(&mut self.rng.vm));
                    if lag == 0 { 0 } else { now + lag }
                };
                let Some(i) = self.cloud.instances.get_mut(&inst) else {
                    return;
                };
                if !i.exit_proc(&uuid, token, stale) {
                    return;
                }
                self.checker.proc_stopped(&uuid);
                if !crash && self.api.set_state(now, &uuid, ContainerState::Complete, "") {
                    self.container_ended(&uuid);
                }
            }
            Ev::UserCancel(uuid) => {
                self.api.user_cancel(now, &uuid);
                if self
                    .api
                    .rows
                    .get(&uuid)
                    .is_some_and(|r| r.c.state.is_final())
                {
                    self.container_ended(&uuid);
                }
            }
            Ev::Child { parent, n } => {
                let Some(wf) = self.payloads.get(&parent).and_then(|p| p.workflow.clone()) else {
                    return;
                };
                if self
                    .api
                    .rows
                    .get(&parent)
                    .is_none_or(|r| r.c.state != ContainerState::Running)
                {
                    // The supervisor died: no more children.
                    return;
                }
                let (mut c, runtime) = from_shape(&wf.child, &mut self.rng.workload);
                self.next_uuid += 1;
                c.uuid = container_uuid(&self.loaded.core.cluster_id, self.next_uuid).into();
                let s = Submission {
                    at: now,
                    container: c,
                    runtime,
                    cancel_after: None,
                    workflow: None,
                };
                self.log.line(
                    now,
                    &format!("A {} child {n} of {parent}", s.container.uuid),
                );
                self.submit(s, Some(parent));
            }
            Ev::ReclaimNotice(id) => {
                if self.cloud.instances.contains_key(&id) {
                    self.log
                        .line(now, &format!("N {id} spot interruption notice"));
                }
            }
            Ev::Reclaim(id) => {
                if !self.cloud.instances.contains_key(&id) {
                    return;
                }
                self.log.line(now, &format!("R {id}"));
                self.cloud.reclaims += 1;
                for uuid in self.cloud.remove(now, &id) {
                    self.checker.proc_stopped(&uuid);
                }
            }
            Ev::Restart => {
                self.log.line(now, "X restart");
                self.retire_dispatcher();
                self.generation += 1;
                self.totals.restarts += 1;
                self.d = new_dispatcher(&self.loaded, self.seed, self.generation, now);
                self.timer_at = None;
                self.d.handle_timeout(Timestamp(now));
                self.after_core();
            }
        }
    }

    fn retire_dispatcher(&mut self) {
        let m = self.d.pool_metrics().clone();
        let t = &mut self.totals.pool;
        for i in 0..4 {
            t.boot_outcomes[i] += m.boot_outcomes[i];
            for e in 0..2 {
                t.driver_operations[i][e] += m.driver_operations[i][e];
            }
        }
        for i in 0..5 {
            t.instances_disappeared[i] += m.instances_disappeared[i];
        }
        t.time_to_ssh.count += m.time_to_ssh.count;
        t.queue_to_crunch_run.count += m.queue_to_crunch_run.count;
        self.totals.passes += self.d.sched_metrics().passes;
        self.totals.ignored_completions += self.d.ignored_completions();
    }

    /// Runs to the end. `progress(now_ms, end_ms)` is called every 64k events.
    pub fn run(&mut self, mut progress: impl FnMut(u64, u64)) {
        let settle = millis(self.scenario.settle.0);
        while let Some((at, ev)) = self.events.pop() {
            if at > self.end {
                self.now = self.end;
                break;
            }
            if let Some(t) = self.ended_all_at
                && at > t + settle
            {
                self.now = t + settle;
                break;
            }
            assert!(at >= self.now, "event heap went backwards");
            self.now = at;
            self.totals.events += 1;
            assert!(
                self.totals.events < STEPS_MAX,
                "step bound reached at t={}",
                self.now
            );
            self.handle(ev);
            if self.totals.events.is_multiple_of(self.check_every) {
                for v in self.d.check_invariants() {
                    self.checker
                        .violation(self.now, format!("core invariant: {v}"));
                }
            }
            if self.totals.events.is_multiple_of(65_536) {
                progress(self.now, self.end);
            }
            if self.ended_all_at.is_some()
                && self.cloud.instances.is_empty()
                && self.d.instances().is_empty()
            {
                break;
            }
        }
        self.retire_dispatcher();
        self.checker
            .finish(self.now, &self.api, &self.cloud, &self.d, &self.loaded);
    }
}

// ----- what-if forks (sim/src/whatif.rs) ---------------------------------------------------

impl World {
    /// Builds a world whose models `prepare` sets up before the dispatcher first runs: a
    /// what-if fork puts instances in the cloud and containers in the controller (queued, or
    /// running on those instances) and adds future arrivals, then the dispatcher starts and
    /// recovers the instances from their tags, as after a restart.
    pub fn new_prepared(
        scenario: Scenario,
        dir: &std::path::Path,
        seed: u64,
        log_out: Option<Box<dyn Write>>,
        prepare: impl FnOnce(&mut World) -> Result<(), WorldError>,
    ) -> Result<World, WorldError> {
        let mut w = World::build(scenario, dir, seed, log_out, true)?;
        w.outbox = None;
        prepare(&mut w)?;
        w.d.handle_timeout(Timestamp(w.now));
        w.after_core();
        Ok(w)
    }

    /// A fresh crunch-run process token, for a process a fork puts on an instance.
    pub fn fork_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// The payload run time of a container a fork puts in the controller.
    pub fn fork_payload(&mut self, uuid: &str, runtime: Duration) {
        self.payloads.insert(
            uuid.into(),
            Payload {
                runtime,
                workflow: None,
                children_left: 0,
                children_total: 0,
                parent: None,
            },
        );
    }

    /// The payload of a crunch-run process a fork put on `inst` ends at `at`.
    pub fn fork_exit(&mut self, at: u64, inst: &str, uuid: &str, token: u64) {
        self.push(
            at,
            Ev::Exit {
                inst: inst.into(),
                uuid: uuid.into(),
                token,
                crash: false,
            },
        );
    }

    /// A future arrival (its container UUID already set).
    pub fn fork_arrival(&mut self, s: Submission) {
        let (i, at) = (self.submissions.len(), s.at);
        self.submissions.push(s);
        self.push(at, Ev::Arrive(i));
    }
}

/// The UUID of the simulator's container number `n`: `format!("{cluster}-dz642-{n:015}")`,
/// written without `fmt` (the workload's arrivals each get one when the world is built).
fn container_uuid(cluster: &str, n: u64) -> String {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let digits = &digits[at.min(digits.len() - 15)..];
    let mut uuid = String::with_capacity(cluster.len() + 7 + digits.len());
    uuid.push_str(cluster);
    uuid.push_str("-dz642-");
    // ASCII digits, so one copy rather than a `char` push (with its UTF-8 encoding) per digit.
    uuid.push_str(std::str::from_utf8(digits).unwrap_or_default());
    uuid
}

fn new_dispatcher(loaded: &Loaded, seed: u64, generation: u32, now: u64) -> Dispatcher {
    Dispatcher::new(
        loaded.core.clone(),
        dispatcher_options(loaded, seed, generation),
        Timestamp(now),
    )
}

/// The options of the simulated dispatcher of generation `generation` (0, then one more per
/// restart) in a run with root seed `seed`.
pub fn dispatcher_options(loaded: &Loaded, seed: u64, generation: u32) -> Options {
    let c = &loaded.core;
    let runner = if c.cloud_vms.deploy_runner_binary.is_empty() {
        RunnerSpec::installed(&c.containers.crunch_run_command)
    } else {
        // The simulated VMs accept any binary; its MD5 only names the deployed file.
        RunnerSpec::deployed(
            &c.cloud_vms.deploy_runner_directory,
            "5eb63bbbe01eeed093cb22bb8f5acdc3",
        )
    };
    Options {
        seed: arvados_dispatch_cloud::core::rng::derive_seed(seed, &format!("core{generation}")),
        instance_set_id: INSTANCE_SET_ID.into(),
        runner,
    }
}

#[cfg(test)]
mod tests {
    use super::{HeapKey, container_uuid};

    /// Packed keys order as the `(time, sequence)` pairs they hold and give back every field.
    #[test]
    fn heap_keys_order_as_time_then_sequence() {
        let fields = [
            (0, 1, 0),
            (0, 2, 16_777_215),
            (5, 1, 7),
            (5, (1 << 40) - 1, 3),
            (u64::MAX, 3, 1),
            (u64::MAX, 4, 0),
        ];
        for &(at, seq, slot) in &fields {
            let k = HeapKey::new(at, seq, slot);
            assert_eq!((k.at(), k.seq(), k.slot()), (at, seq, slot));
            for &(at2, seq2, slot2) in &fields {
                let k2 = HeapKey::new(at2, seq2, slot2);
                assert_eq!(
                    k.cmp(&k2),
                    (at, seq).cmp(&(at2, seq2)),
                    "{at} {seq} vs {at2} {seq2}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "at most 2^40 events")]
    fn heap_keys_refuse_sequence_numbers_that_do_not_fit() {
        HeapKey::new(0, 1 << 40, 0);
    }

    #[test]
    fn container_uuids_are_what_format_writes() {
        for n in [
            0,
            1,
            9,
            10,
            12_345,
            99_999_999_999_999,
            999_999_999_999_999,
            1_000_000_000_000_000,
            u64::MAX,
        ] {
            assert_eq!(container_uuid("zzzzz", n), format!("zzzzz-dz642-{n:015}"));
            assert_eq!(container_uuid("", n), format!("-dz642-{n:015}"));
        }
    }
}
