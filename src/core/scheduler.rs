//! The scheduling pass (`runQueue`, reference-scheduler.md §2) as a pure function.
//!
//! `plan(&Snapshot, now) -> Plan` reads a snapshot of the queue and the pool and decides, in
//! queue order, which containers to lock, start, create instances for, kill, unlock, and which
//! instances to shut down. It never mutates anything: the pool's answers to `Create`,
//! `StartContainer` and `KillContainer` are modelled from the snapshot (the dispatcher then
//! applies the plan through the real pool, which enforces the same rules). Karpenter calls
//! this split Solve/Record.
//!
//! Cost. Go's pass scans, for each container, every instance of its eligible types:
//! O(N × M). Here the candidates of each type sit, in instance order, at the leaves of a
//! binary tree whose inner nodes hold bounds of the room left below them (per resource), of
//! the room left in those running containers, of their container count, and whether any is
//! ready ([`CandTree`]). §2.9's choice (the first fitting candidate with the most containers,
//! preferring ready ones, decided by a scan in instance order) is computed by one walk in
//! that order that skips every subtree whose bounds cannot fit the container or cannot beat
//! the choice so far: the walk visits the candidates that change the choice plus the paths to
//! them, O(changes × log M) nodes in practice rather than M. An instance taken by a
//! container, or created by the pass, updates one leaf-to-root path, O(log M). When the
//! instances of two eligible types interleave in instance order (equal price and size, or a
//! price that differs from the type's), the walk collects every fitting candidate and sorts
//! them instead. The queue costs O(N log N) for the order, plus reading each entry once: the
//! entries are copied into compact rows in one merge, in UUID order, with `Running()` and the
//! instances' containers (no lookup per entry), so that the rest of the pass reads only the
//! rows. The test module compares `plan` with the previous, plain implementation on random
//! snapshots.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use super::fastcmp::{sort_by_str_key, str_cmp};
use super::key::Key;
use super::queue::QueueEntry;
use super::select::{TypeId, TypeTable};
use super::time::Timestamp;
use super::types::{ContainerState, IdleBehavior, InstanceView, Resources, WorkerState};

/// How long after a 503 the concurrency limit stays where the 503 put it.
pub const QUIET_PERIOD_503: Duration = Duration::from_secs(60);

/// Scheduler state that persists across passes (§2.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedState {
    /// Dynamic concurrency limit; 0 means unlimited.
    pub max_containers: usize,
    /// The last 503 acted on (ZERO = never).
    pub last_503_acted: Timestamp,
    /// Highest instance count known to work since the last quota condition (0 = none seen).
    pub instances_within_quota: usize,
}

impl SchedState {
    /// Initial state: `InitialQuotaEstimate` if > 0, else `MaxInstances`.
    pub fn initial(initial_quota_estimate: usize, max_instances: usize) -> SchedState {
        SchedState {
            max_containers: if initial_quota_estimate > 0 {
                initial_quota_estimate
            } else {
                max_instances
            },
            last_503_acted: Timestamp::ZERO,
            instances_within_quota: 0,
        }
    }
}

/// What the plan needs to know about the pool's create gate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolLimits {
    /// A quota error is remembered (AtQuota without the MaxInstances part).
    pub quota_error: bool,
    /// `MaxInstances` (0 = unlimited).
    pub max_instances: usize,
    /// Workers plus creates in flight.
    pub instance_count: usize,
    /// Creates in flight.
    pub creating: usize,
    /// `MaxConcurrentInstanceCreateOps` (0 = unlimited).
    pub max_concurrent_creates: usize,
    /// The runner cannot be loaded or the create throttle is active.
    pub create_blocked: bool,
    /// Capacity keys ("" for all, quota groups, type keys) with an unexpired error.
    pub capacity_blocked: BTreeSet<String>,
}

/// Everything one pass reads.
#[derive(Clone, Debug)]
pub struct Snapshot<'a, I: PlanInstance = InstanceView> {
    /// Configured types.
    pub types: &'a TypeTable,
    /// The queue, by UUID.
    pub queue: &'a BTreeMap<Key, QueueEntry>,
    /// `Running()`: UUID → exit time (`None` while crunch-run lives).
    pub running: &'a BTreeMap<Key, Option<Timestamp>>,
    /// What a caller that keeps a runner index (the pool) adds: the pass then reads it
    /// instead of every instance's containers and of `running`. `None`: read those.
    pub indexed: Option<Indexed<'a>>,
    /// `Instances()`, in Go's order: by ID (pending creates, with the empty ID, first), ties by
    /// type name. The pool passes references to its workers; tests pass `InstanceView`s.
    pub instances: &'a [I],
    /// Sum of `CountWorkers()` (every state, no pending creates).
    pub total_instances: usize,
    /// The pool's create gate.
    pub pool: PoolLimits,
    /// Persistent scheduler state.
    pub state: SchedState,
    /// Time of the last API 503 (ZERO = never).
    pub last_503: Timestamp,
    /// `MaxRunningContainersPerInstance`.
    pub max_running_per_instance: usize,
    /// `SupervisorFraction`.
    pub supervisor_fraction: f64,
}

/// What a caller that keeps a runner index (the pool) hands a pass with its snapshot.
#[derive(Clone, Copy, Debug)]
pub struct Indexed<'a> {
    /// The instances' containers, by container UUID: exactly the pairs
    /// `instances[..].running_uuids()` give, each UUID on one instance, named by its ID and
    /// its [`PlanInstance::slot`]. The pass reads it instead of every instance's containers,
    /// and needs no sort.
    pub runners: &'a BTreeMap<Key, RunnerAt>,
    /// `Running()`'s exit placeholders: `Snapshot::running` is exactly these (each
    /// `Some(time)`) and the runners (each `None`), which are disjoint. The pass reads these
    /// two instead of `running`.
    pub exited: &'a BTreeMap<Key, Timestamp>,
    /// `instances` is in the order [`Snapshot::instances`] describes (the pool lists them
    /// from its ID-ordered map), so the pass does not check it. Debug builds check anyway.
    pub instances_sorted: bool,
}

/// Where a container's runner is: its instance's ID and slot (the pool's runner index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerAt {
    /// The instance's cloud ID.
    pub id: Key,
    /// The instance's [`PlanInstance::slot`].
    pub slot: u32,
}

/// What a pass reads of one instance (`InstanceView`'s scheduling fields). The pool
/// implements it on references to its workers, so a pass copies nothing per instance.
pub trait PlanInstance {
    /// Cloud ID; "" for a pending create.
    fn id(&self) -> &str;
    /// Configured type name.
    fn type_name(&self) -> &str;
    /// Configured hourly price.
    fn price(&self) -> f64;
    /// `(types.id(self.type_name()), self.price())`. Implementations that hold the type's
    /// index answer without the lookup by name.
    fn type_and_price(&self, types: &TypeTable) -> (Option<TypeId>, f64) {
        (types.id(self.type_name()), self.price())
    }
    /// Containers running or starting on it (any order); empty for a pending create.
    fn running_uuids(&self) -> impl Iterator<Item = &str>;
    /// How many `running_uuids` yields.
    fn running_count(&self) -> usize;
    /// State.
    fn state(&self) -> WorkerState;
    /// Idle behaviour.
    fn idle_behavior(&self) -> IdleBehavior;
    /// A small number unique among the snapshot's instances, which the runner index repeats
    /// ([`RunnerAt::slot`]): the pass finds a runner's instance by it. `None` (the default)
    /// for an instance that no runner index names.
    fn slot(&self) -> Option<u32> {
        None
    }
}

impl PlanInstance for InstanceView {
    fn id(&self) -> &str {
        &self.instance
    }
    fn type_name(&self) -> &str {
        &self.arvados_instance_type
    }
    fn price(&self) -> f64 {
        self.price
    }
    fn running_uuids(&self) -> impl Iterator<Item = &str> {
        self.running_container_uuids
            .iter()
            .flatten()
            .map(String::as_str)
    }
    fn running_count(&self) -> usize {
        self.running_container_uuids.as_ref().map_or(0, Vec::len)
    }
    fn state(&self) -> WorkerState {
        self.worker_state
    }
    fn idle_behavior(&self) -> IdleBehavior {
        self.idle_behavior
    }
}

/// A scheduling status (§2.15). `text` renders the exact Arvados string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Status {
    /// "" (a Running container, or nothing to say).
    #[default]
    None,
    /// Allocated and preparing.
    Preparing,
    /// Priority 0 in this state.
    PriorityZero(ContainerState),
    /// Over the supervisor limit, at this position.
    SupervisorLimit(usize),
    /// An earlier crunch-run is still alive.
    WaitingPreviousAttempt,
    /// Waiting for an instance of this type to boot.
    WaitingNewInstance(TypeId),
    /// Every eligible type is at capacity; position.
    WaitingInstanceType(usize),
    /// At cloud quota; position.
    WaitingCloudResources(usize),
    /// At capacity; position.
    WaitingClusterCapacity(usize),
}

impl Status {
    /// The exact status string (two spaces after each period).
    pub fn text(&self, entry: &QueueEntry, types: &TypeTable) -> String {
        match self {
            Status::None => String::new(),
            Status::Preparing => {
                "Container is allocated to an instance and preparing to run.".to_string()
            }
            Status::PriorityZero(state) => format!(
                "This container will not be scheduled to run because its priority is 0 and state is {state}."
            ),
            Status::SupervisorLimit(pos) => format!(
                "Waiting in workflow queue at position {pos}.  Cluster is at capacity and cannot start any new workflows right now."
            ),
            Status::WaitingPreviousAttempt => {
                "Waiting for previous container attempt to exit.".to_string()
            }
            Status::WaitingNewInstance(t) => format!(
                "Waiting for a {} instance to boot and be ready to accept work.",
                types.get(*t).name
            ),
            Status::WaitingInstanceType(pos) => {
                let names: Vec<&str> = entry
                    .types
                    .iter()
                    .map(|t| types.get(*t).name.as_str())
                    .collect();
                format!(
                    "Waiting in queue at position {pos}.  Cluster is at capacity for all eligible instance types ({}) and cannot start a new instance right now.",
                    names.join(", ")
                )
            }
            Status::WaitingCloudResources(pos) => format!(
                "Waiting in queue at position {pos}.  Cluster is at cloud account limits and cannot start any new instances right now."
            ),
            Status::WaitingClusterCapacity(pos) => format!(
                "Waiting in queue at position {pos}.  Cluster is at capacity and cannot start any new instances right now."
            ),
        }
    }
}

/// One decision, in the order the pass made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Lock a Queued container.
    Lock(String),
    /// Start a Locked container on an idle or running instance.
    Start {
        /// Cloud ID.
        instance: String,
        /// Container.
        uuid: String,
    },
    /// Create an instance of this type (for this container).
    Create {
        /// Type.
        type_id: TypeId,
        /// The container it is for.
        uuid: String,
    },
    /// Kill a leftover crunch-run.
    Kill {
        /// Container.
        uuid: String,
        /// Reason ("about to lock", "about to start").
        reason: &'static str,
    },
    /// Unlock a Locked container (over quota or over the supervisor limit).
    Unlock(String),
    /// Shut down an unallocated instance (at quota).
    Shutdown(String),
}

/// Where an entry stands in the scheduling order (§2.5): entries with a `Running()` entry
/// first, then Locked ones, then higher priority, then earlier first seen; equal ranks go by
/// UUID. Compared as a whole: its parts are private.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank(u8, u64, u64);

/// The result of one pass.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    /// Every queue entry, in UUID order (the queue's), with its status and its rank. In this
    /// order a caller copies them without visiting the queue at random; [`Plan::queue`] and
    /// [`in_scheduling_order`] give the scheduling order.
    pub entries: Vec<(&'a Key, Status, Rank)>,
    /// Decisions, in order.
    pub actions: Vec<Action>,
    /// Every `Create` the pass tried, accepted or not (the Go tests count these).
    pub create_attempts: Vec<(TypeId, bool)>,
    /// A create was refused at MaxConcurrentInstanceCreateOps: the pool sets its 5 s holdoff.
    pub hit_create_limit: bool,
    /// State for the next pass.
    pub state: SchedState,
    /// Gauge `containers_allocated_not_started`.
    pub allocated_not_started: usize,
    /// Gauge `containers_not_allocated_over_quota`.
    pub not_allocated_over_quota: usize,
    /// What the pass's merge of the queue with `Running()` found for the dispatcher's `sync`.
    pub sync: SyncFacts<'a>,
}

impl<'a> Plan<'a> {
    /// The entries' UUIDs (the queue's keys) with their statuses, in scheduling order.
    #[must_use]
    pub fn queue(&self) -> Vec<(&'a Key, Status)> {
        in_scheduling_order(&self.entries)
            .map(|&(k, st, _)| (k, st))
            .collect()
    }
}

/// `entries`, given in UUID order with their ranks (as [`Plan::entries`]), in scheduling
/// order: by rank, equal ranks in UUID order.
pub fn in_scheduling_order<K, S>(entries: &[(K, S, Rank)]) -> impl Iterator<Item = &(K, S, Rank)> {
    let mut order: Vec<usize> = (0..entries.len()).collect();
    // Stable: equal ranks keep their UUID order.
    order.sort_by_key(|&i| entries[i].2);
    order.into_iter().map(move |i| &entries[i])
}

/// What `sync` (§3.1) reads of the queue and `Running()`, found by the pass's own merge of the
/// two (so that `sync` need not walk them again). The pass's starts are the only actions that
/// change either before `sync` runs, and they start entries that are not `suspects`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyncFacts<'a> {
    /// The entries `sync` may act on, in UUID order, with their `Running()` entry (`None`:
    /// none; `Some(None)`: a live runner; `Some(Some(t))`: crunch-run exited at `t`). The
    /// others are wanted (priority ≠ 0) and either Running with a live runner, Queued with no
    /// `Running()` entry, or Locked with none or a live runner: `sync` leaves those alone.
    pub suspects: Vec<(&'a Key, Option<Option<Timestamp>>)>,
    /// The `Running()` UUIDs the queue lacks, in UUID order.
    pub strays: Vec<&'a str>,
    /// The earliest `created_at` of the entries that are not suspects and wait (priority > 0,
    /// Queued or Locked, no `Running()` entry) once the pass's starts are made.
    pub oldest_waiting: Option<Timestamp>,
}

/// The part of an instance's sort key that its type decides: price, then more VCPUs, more
/// RAM, more scratch first.
fn prefix_cmp(a: (f64, i64, i64, i64), b: (f64, i64, i64, i64)) -> Ordering {
    a.0.total_cmp(&b.0)
        .then(b.1.cmp(&a.1))
        .then(b.2.cmp(&a.2))
        .then(b.3.cmp(&a.3))
}

/// Positions `0..prefixes.len()` sorted stably by [`prefix_cmp`]: what
/// `sort_by(|a, b| prefix_cmp(prefixes[a], prefixes[b]))` gives.
///
/// A pass's instances have few distinct prefixes (about one per instance type), so this
/// counts them per distinct prefix and places each position in one sweep, instead of
/// sorting with a comparator that reads two prefixes per step. With many distinct prefixes
/// it sorts.
fn stable_order_by_prefix(prefixes: &[(f64, i64, i64, i64)]) -> Vec<usize> {
    const MAX_DISTINCT: usize = 32;
    let mut distinct: Vec<(f64, i64, i64, i64)> = Vec::new();
    let mut class: Vec<u8> = Vec::with_capacity(prefixes.len());
    let mut last = usize::MAX;
    for &p in prefixes {
        let same = |c: &(f64, i64, i64, i64)| prefix_cmp(*c, p) == Ordering::Equal;
        if last == usize::MAX || !same(&distinct[last]) {
            last = match distinct.iter().position(same) {
                Some(c) => c,
                None if distinct.len() < MAX_DISTINCT => {
                    distinct.push(p);
                    distinct.len() - 1
                }
                None => {
                    let mut order: Vec<usize> = (0..prefixes.len()).collect();
                    order.sort_by(|&a, &b| prefix_cmp(prefixes[a], prefixes[b]));
                    return order;
                }
            };
        }
        class.push(last as u8);
    }
    // Each distinct prefix's rank, then where its first position goes.
    let mut by_rank: Vec<usize> = (0..distinct.len()).collect();
    by_rank.sort_by(|&a, &b| prefix_cmp(distinct[a], distinct[b]));
    let mut counts = [0usize; MAX_DISTINCT];
    for &c in &class {
        counts[usize::from(c)] += 1;
    }
    let mut start = [0usize; MAX_DISTINCT];
    let mut next = 0;
    for c in by_rank {
        start[c] = next;
        next += counts[c];
    }
    let mut order = vec![0usize; prefixes.len()];
    for (pos, &c) in class.iter().enumerate() {
        let slot = &mut start[usize::from(c)];
        order[*slot] = pos;
        *slot += 1;
    }
    order
}

#[derive(Clone, Copy, Debug)]
struct InstKey<'a> {
    price: f64,
    vcpus: i64,
    ram: i64,
    scratch: i64,
    id: &'a str,
    tie: i64,
}

impl InstKey<'_> {
    fn prefix(&self) -> (f64, i64, i64, i64) {
        (self.price, self.vcpus, self.ram, self.scratch)
    }

    fn cmp(&self, o: &InstKey<'_>) -> Ordering {
        prefix_cmp(self.prefix(), o.prefix())
            .then_with(|| str_cmp(self.id, o.id))
            // `tie` is unique: the original position, or a negative insertion number.
            .then(self.tie.cmp(&o.tie))
    }
}

/// Where a candidate sits in its type's [`Cands`].
#[derive(Clone, Copy, Debug)]
struct Slot {
    type_index: usize,
    /// Created by this pass (in `Cands::created`) rather than existing (in `Cands::existing`).
    created: bool,
    pos: usize,
}

#[derive(Clone, Debug)]
struct Inst<'a> {
    id: &'a str,
    type_id: Option<TypeId>,
    state: WorkerState,
    behavior: IdleBehavior,
    count: usize,
    remaining: Resources,
    key: InstKey<'a>,
    /// `None` for an instance that can never take a container (no configured type, not
    /// `run`, or shutting down).
    slot: Option<Slot>,
}

impl Inst<'_> {
    fn ready(&self) -> bool {
        matches!(self.state, WorkerState::Idle | WorkerState::Running)
    }
}

/// A candidate as §2.9 sees it: a leaf of a [`CandTree`]. `None` in the tree once it can take
/// no more containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leaf {
    room: Resources,
    count: usize,
    ready: bool,
}

/// Resources rounded up to a compact form: VCPUs and GPUs as `i32`, byte sizes in MiB,
/// saturated. Rounding up and saturating keep the order (`a >= b` implies
/// `Bound::of(a) >= Bound::of(b)`), so a bound that is too small proves a misfit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bound {
    vcpus: i32,
    ram_mib: i32,
    scratch_mib: i32,
    gpus: i32,
    gpu_vram_mib: i32,
}

fn sat32(x: i64) -> i32 {
    x.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

fn mib_up(x: i64) -> i32 {
    sat32(x.div_euclid(1 << 20) + i64::from(x.rem_euclid(1 << 20) != 0))
}

impl Bound {
    const NONE: Bound = Bound {
        vcpus: i32::MIN,
        ram_mib: i32::MIN,
        scratch_mib: i32::MIN,
        gpus: i32::MIN,
        gpu_vram_mib: i32::MIN,
    };

    fn of(vcpus: i64, ram: i64, scratch: i64, gpus: i64, gpu_vram: i64) -> Bound {
        Bound {
            vcpus: sat32(vcpus),
            ram_mib: mib_up(ram),
            scratch_mib: mib_up(scratch),
            gpus: sat32(gpus),
            gpu_vram_mib: mib_up(gpu_vram),
        }
    }

    fn max(self, o: Bound) -> Bound {
        Bound {
            vcpus: self.vcpus.max(o.vcpus),
            ram_mib: self.ram_mib.max(o.ram_mib),
            scratch_mib: self.scratch_mib.max(o.scratch_mib),
            gpus: self.gpus.max(o.gpus),
            gpu_vram_mib: self.gpu_vram_mib.max(o.gpu_vram_mib),
        }
    }

    /// False when no candidate under this bound can accommodate `need` (already converted):
    /// each condition of [`Resources::accommodates`] that survives the conversion.
    fn may_fit(&self, need: &Bound) -> bool {
        self.vcpus > 0
            && self.vcpus >= need.vcpus
            && self.ram_mib >= need.ram_mib
            && self.scratch_mib >= need.scratch_mib
            && self.gpus >= need.gpus
            && self.gpu_vram_mib >= need.gpu_vram_mib
    }
}

/// A summary of the candidates under a [`CandTree`] node: bounds of the room they have left,
/// of the VCPUs and RAM left in those that run at least one container ("busy"), of their
/// container count, and whether any is ready. 32 bytes, so that a walk touches little memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Node {
    room: Bound,
    busy_vcpus: i32,
    busy_ram_mib: i32,
    /// The largest container count, saturated at `COUNT_MAX`, and `READY` if any is ready.
    count_ready: u32,
}

const _: () = assert!(std::mem::size_of::<Node>() == 32);

/// A count this large or larger is not known exactly in a [`Node`].
const COUNT_MAX: u32 = (1 << 31) - 1;
const READY: u32 = 1 << 31;

impl Node {
    const NONE: Node = Node {
        room: Bound::NONE,
        busy_vcpus: i32::MIN,
        busy_ram_mib: i32::MIN,
        count_ready: 0,
    };

    fn count(&self) -> u32 {
        self.count_ready & COUNT_MAX
    }

    fn ready(&self) -> bool {
        self.count_ready & READY != 0
    }

    fn of(leaf: &Option<Leaf>) -> Node {
        let Some(l) = leaf else {
            return Node::NONE;
        };
        let r = &l.room;
        let room = Bound::of(r.vcpus, r.ram, r.scratch, r.gpus, r.gpu_vram);
        let busy = l.count > 0;
        Node {
            room,
            busy_vcpus: if busy { room.vcpus } else { i32::MIN },
            busy_ram_mib: if busy { room.ram_mib } else { i32::MIN },
            count_ready: u32::try_from(l.count).map_or(COUNT_MAX, |c| c.min(COUNT_MAX))
                | if l.ready { READY } else { 0 },
        }
    }

    fn join(a: Node, b: Node) -> Node {
        Node {
            room: a.room.max(b.room),
            busy_vcpus: a.busy_vcpus.max(b.busy_vcpus),
            busy_ram_mib: a.busy_ram_mib.max(b.busy_ram_mib),
            count_ready: a.count().max(b.count()) | ((a.count_ready | b.count_ready) & READY),
        }
    }
}

/// The §2.9 choice so far: an instance index, with its count and readiness.
#[derive(Clone, Copy, Debug)]
struct Best {
    inst: usize,
    count: usize,
    ready: bool,
}

impl Best {
    /// Go replaces the choice with the next fitting candidate when that one runs more
    /// containers, or is ready while the choice is not.
    fn beaten_by(&self, l: &Leaf) -> bool {
        l.count > self.count || (!self.ready && l.ready)
    }

    /// False when no fitting candidate under `n` can replace the choice. A candidate that
    /// beats a ready choice runs more containers than it, so at least one: it must fit the
    /// bounds of the busy candidates.
    fn may_be_beaten(&self, n: &Node, need: &Bound) -> bool {
        let more = n.count() == COUNT_MAX || n.count() as usize > self.count;
        if self.ready {
            more && n.busy_vcpus >= need.vcpus.max(1) && n.busy_ram_mib >= need.ram_mib
        } else {
            more || n.ready()
        }
    }
}

/// One range of a [`CandTree`] to visit for a container, in slot order or reversed.
struct Query<'q> {
    lo: usize,
    hi: usize,
    need: &'q Resources,
    bound: Bound,
    reverse: bool,
}

/// A complete binary tree over a sequence of candidate slots, each inner node summarising its
/// subtree ([`Node::join`]). A search skips every subtree whose bounds cannot fit the
/// container, and, when it only needs the §2.9 choice, every subtree that cannot change it.
#[derive(Clone, Debug)]
struct CandTree {
    /// Leaves of the complete tree (a power of two).
    width: usize,
    /// Slots in use.
    len: usize,
    /// `nodes[1]` is the root; the leaf summaries start at `width`.
    nodes: Vec<Node>,
    leaves: Vec<Option<Leaf>>,
}

impl CandTree {
    fn new(mut leaves: Vec<Option<Leaf>>, min_width: usize) -> CandTree {
        let len = leaves.len();
        let width = len.max(min_width).next_power_of_two();
        // The inner nodes, then the leaves' summaries, each written once; the inner nodes
        // are filled from the bottom up once the summaries are in place.
        let mut nodes = Vec::with_capacity(2 * width);
        nodes.resize(width, Node::NONE);
        nodes.extend(leaves.iter().map(Node::of));
        nodes.resize(2 * width, Node::NONE);
        for n in (1..width).rev() {
            nodes[n] = Node::join(nodes[2 * n], nodes[2 * n + 1]);
        }
        leaves.resize(width, None);
        CandTree {
            width,
            len,
            nodes,
            leaves,
        }
    }

    fn set(&mut self, pos: usize, leaf: Option<Leaf>) {
        self.leaves[pos] = leaf;
        let mut n = self.width + pos;
        self.nodes[n] = Node::of(&leaf);
        while n > 1 {
            n /= 2;
            self.nodes[n] = Node::join(self.nodes[2 * n], self.nodes[2 * n + 1]);
        }
    }

    /// Appends a slot; returns its position.
    fn push(&mut self, leaf: Option<Leaf>) -> usize {
        if self.len == self.width {
            let mut leaves = std::mem::take(&mut self.leaves);
            leaves.truncate(self.len);
            *self = CandTree::new(leaves, 2 * self.width);
        }
        let pos = self.len;
        self.len += 1;
        self.set(pos, leaf);
        pos
    }

    /// Appends `slots[p]` for every slot `p` of the range whose candidate fits, in order.
    fn collect(&self, q: &Query<'_>, slots: &[usize], out: &mut Vec<usize>) {
        if q.lo < q.hi {
            self.collect_from(1, (0, self.width), q, slots, out);
        }
    }

    fn collect_from(
        &self,
        node: usize,
        (lo, hi): (usize, usize),
        q: &Query<'_>,
        slots: &[usize],
        out: &mut Vec<usize>,
    ) {
        if hi <= q.lo || q.hi <= lo || !self.nodes[node].room.may_fit(&q.bound) {
            return;
        }
        if node >= self.width {
            if self.leaves[lo].is_some_and(|l| l.room.accommodates(q.need)) {
                out.push(slots[lo]);
            }
            return;
        }
        let mid = (lo + hi) / 2;
        let halves = [(2 * node, (lo, mid)), (2 * node + 1, (mid, hi))];
        let order = if q.reverse { [1, 0] } else { [0, 1] };
        for h in order {
            let (child, span) = halves[h];
            self.collect_from(child, span, q, slots, out);
        }
    }

    /// Folds the range's fitting candidates, in order, into the §2.9 choice `best`.
    fn choose(&self, q: &Query<'_>, slots: &[usize], best: &mut Option<Best>) {
        if q.lo < q.hi {
            self.choose_from(1, (0, self.width), q, slots, best);
        }
    }

    fn choose_from(
        &self,
        node: usize,
        (lo, hi): (usize, usize),
        q: &Query<'_>,
        slots: &[usize],
        best: &mut Option<Best>,
    ) {
        let n = &self.nodes[node];
        if hi <= q.lo || q.hi <= lo || !n.room.may_fit(&q.bound) {
            return;
        }
        // Nothing below can replace the choice: skipping the subtree leaves it unchanged.
        if best.is_some_and(|b| !b.may_be_beaten(n, &q.bound)) {
            return;
        }
        if node >= self.width {
            if let Some(l) = self.leaves[lo]
                && l.room.accommodates(q.need)
                && best.is_none_or(|b| b.beaten_by(&l))
            {
                *best = Some(Best {
                    inst: slots[lo],
                    count: l.count,
                    ready: l.ready,
                });
            }
            return;
        }
        let mid = (lo + hi) / 2;
        let halves = [(2 * node, (lo, mid)), (2 * node + 1, (mid, hi))];
        let order = if q.reverse { [1, 0] } else { [0, 1] };
        for h in order {
            let (child, span) = halves[h];
            self.choose_from(child, span, q, slots, best);
        }
    }
}

/// The candidates of one type, in instance order: `existing[..split]`, then the instances
/// this pass created (newest first: their `tie` is minus the insertion number), then
/// `existing[split..]`. Every created instance of a type sorts at the same place among the
/// existing ones, because created instances differ from each other only in `tie`.
#[derive(Clone, Debug)]
struct Cands {
    existing: Vec<usize>,
    existing_tree: CandTree,
    split: usize,
    /// Oldest first.
    created: Vec<usize>,
    created_tree: CandTree,
}

impl Cands {
    /// The three ranges, in instance order, as (tree, slots, query).
    fn ranges<'c, 'q>(
        &'c self,
        need: &'q Resources,
    ) -> [(&'c CandTree, &'c [usize], Query<'q>); 3] {
        let bound = Bound::of(need.vcpus, need.ram, need.scratch, need.gpus, need.gpu_vram);
        let q = |lo, hi, reverse| Query {
            lo,
            hi,
            need,
            bound,
            reverse,
        };
        [
            (&self.existing_tree, &self.existing, q(0, self.split, false)),
            (
                &self.created_tree,
                &self.created,
                q(0, self.created.len(), true),
            ),
            (
                &self.existing_tree,
                &self.existing,
                q(self.split, self.existing.len(), false),
            ),
        ]
    }
}

/// One distinct eligible-type list, and how [`Pass::find_best`] visits its candidates.
#[derive(Clone, Copy, Debug)]
struct ListPlan {
    /// Range of `Pass::list_types`: the list as the entries have it (§2.10 reads it in order).
    types: (usize, usize),
    /// Range of `Pass::list_types`: the types to visit, in this order.
    visit: (usize, usize),
    /// The types' instances occupy disjoint, ordered stretches of the instance order, so
    /// visiting the types in turn yields the candidates already sorted. Otherwise the found
    /// candidates are sorted.
    sorted: bool,
}

/// A fixed-seed FxHash: lookup tables of one pass hash the same way on every run (std's
/// `RandomState` reads the OS).
#[derive(Clone, Copy, Debug, Default)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Whole words, then the tail a byte at a time (a copy of the tail into a word would be
        // a call to `memcpy` per key).
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.add(u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
        }
        let mut tail = 0u64;
        for (i, &b) in words.remainder().iter().enumerate() {
            tail |= u64::from(b) << (8 * i);
        }
        if !words.remainder().is_empty() {
            self.add(tail);
        }
    }
    fn write_u8(&mut self, v: u8) {
        self.add(u64::from(v));
    }
    fn write_u32(&mut self, v: u32) {
        self.add(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }
    fn write_i64(&mut self, v: i64) {
        self.add(v as u64);
    }
    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A lookup table of one pass. Never iterated, so its order cannot leak into a plan, and
/// hashed with a fixed seed, so it reads no OS randomness.
#[allow(clippy::disallowed_types)]
type Table<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// One queue entry with its `Running()` entry, if any, and a copy of what every row's visit
/// reads (read once, in UUID order: the pass then visits the rows in queue order without
/// touching the entries again, except those that look for an instance, which read their
/// needs and eligible types). 32 bytes.
#[derive(Clone, Copy, Debug)]
struct Row<'a> {
    e: &'a QueueEntry,
    /// The UUID (the queue's key).
    key: &'a Key,
    run: Run,
    state: ContainerState,
    /// Priority ≥ 1.
    positive: bool,
    supervisor: bool,
}

const _: () = assert!(std::mem::size_of::<Row<'static>>() == 24);

/// A queue entry's `Running()` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// None.
    Not,
    /// A live runner (`None`, no exit time).
    Live,
    /// An exit placeholder.
    Exited,
}

struct Pass<'s, 'a, I: PlanInstance> {
    snap: &'s Snapshot<'a, I>,
    insts: Vec<Inst<'a>>,
    /// Instances `..existing` are the snapshot's, sorted by key; the rest were created here.
    existing: usize,
    /// Per type (by index).
    cands: Vec<Cands>,
    /// Per type: every existing candidate has the type's price (so its whole sort-key prefix
    /// is the type's).
    uniform: Vec<bool>,
    /// The distinct eligible-type lists, in the order rows that look for an instance first
    /// name them (only those rows read their entry's list, so the others' lists are never
    /// loaded).
    lists: Vec<ListPlan>,
    list_ids: Table<&'a [TypeId], u32>,
    list_types: Vec<TypeId>,
    /// Instances created so far in this pass.
    inserts: u64,
    /// Scratch space for the candidates [`CandTree::collect`] finds.
    found: Vec<usize>,
    /// Per type: index of its "<ProviderType>, preemptible=<bool>" key.
    pass_key: Vec<usize>,
    /// Per pass key: found at capacity during this pass.
    atcapacity: Vec<bool>,
    /// Per type: the pool's AtCapacity.
    pool_at_capacity: Vec<bool>,
    instance_count: usize,
    creating: usize,
    create_throttled: bool,
}

impl<'a, I: PlanInstance> Pass<'_, 'a, I> {
    fn at_quota(&self) -> bool {
        let p = &self.snap.pool;
        p.quota_error || (p.max_instances > 0 && self.instance_count >= p.max_instances)
    }

    fn alive(&self, i: usize) -> bool {
        let inst = &self.insts[i];
        let limit = self.snap.max_running_per_instance;
        (limit == 0 || inst.count < limit) && inst.remaining.vcpus > 0
    }

    /// A candidate's leaf: `None` once it can take no more containers.
    fn leaf(&self, i: usize) -> Option<Leaf> {
        let inst = &self.insts[i];
        self.alive(i).then(|| Leaf {
            room: inst.remaining,
            count: inst.count,
            ready: inst.ready(),
        })
    }

    /// Brings a candidate's leaf up to date after a change.
    fn refresh(&mut self, i: usize) {
        let slot = self.insts[i].slot.expect("a candidate");
        let leaf = self.leaf(i);
        let c = &mut self.cands[slot.type_index];
        if slot.created {
            c.created_tree.set(slot.pos, leaf);
        } else {
            c.existing_tree.set(slot.pos, leaf);
        }
    }

    /// Instance order: by index among the snapshot's instances, by key otherwise.
    fn inst_cmp(&self, a: usize, b: usize) -> Ordering {
        if a < self.existing && b < self.existing {
            a.cmp(&b)
        } else {
            self.insts[a].key.cmp(&self.insts[b].key)
        }
    }

    /// The index in `lists` of the eligible types `types`, planned at first sight.
    fn list(&mut self, types: &'a [TypeId]) -> u32 {
        if let Some(&id) = self.list_ids.get(types) {
            return id;
        }
        let id = u32::try_from(self.lists.len()).expect("fewer than 2^32 distinct type lists");
        let l = self.plan_list(types);
        self.lists.push(l);
        self.list_ids.insert(types, id);
        id
    }

    /// How to visit the candidates of the eligible types `types`.
    fn plan_list(&mut self, types: &[TypeId]) -> ListPlan {
        let start = self.list_types.len();
        self.list_types.extend_from_slice(types);
        let mid = self.list_types.len();
        let prefix = |t: &TypeId| {
            let it = self.snap.types.get(*t);
            (it.price, it.vcpus, it.ram, it.scratch)
        };
        let mut by_key = types.to_vec();
        by_key.sort_by(|a, b| prefix_cmp(prefix(a), prefix(b)));
        let sorted = types.iter().all(|t| self.uniform[t.0 as usize])
            && by_key
                .windows(2)
                .all(|w| prefix_cmp(prefix(&w[0]), prefix(&w[1])) == Ordering::Less);
        self.list_types
            .extend_from_slice(if sorted { &by_key } else { types });
        ListPlan {
            types: (start, mid),
            visit: (mid, self.list_types.len()),
            sorted,
        }
    }

    /// §2.9: the best existing instance for the row's container, whose eligible types are
    /// `lists[list]`, or `None`.
    fn find_best(&mut self, row: &Row<'a>, list: u32) -> Option<usize> {
        let l = self.lists[list as usize];
        let types = &self.list_types[l.visit.0..l.visit.1];
        if l.sorted || types.len() == 1 {
            // One walk in instance order, skipping what cannot fit or cannot change the choice.
            let mut best = None;
            for t in types {
                for (tree, slots, q) in self.cands[t.0 as usize].ranges(&row.e.resources) {
                    tree.choose(&q, slots, &mut best);
                }
            }
            return best.map(|b| b.inst);
        }
        // The types' instances interleave: gather every fitting one, sort, then choose.
        let mut found = std::mem::take(&mut self.found);
        found.clear();
        for t in types {
            for (tree, slots, q) in self.cands[t.0 as usize].ranges(&row.e.resources) {
                tree.collect(&q, slots, &mut found);
            }
        }
        found.sort_unstable_by(|a, b| self.inst_cmp(*a, *b));
        let best = self.pick(&found);
        self.found = found;
        best
    }

    /// Of the fitting candidates in instance order: the first with the most containers,
    /// preferring a ready one over one that is not (Go's comparison, kept as a scan).
    fn pick(&self, found: &[usize]) -> Option<usize> {
        let mut best: Option<usize> = None;
        for &c in found {
            best = match best {
                None => Some(c),
                Some(b) if self.insts[c].count > self.insts[b].count => Some(c),
                Some(b) if !self.insts[b].ready() && self.insts[c].ready() => Some(c),
                keep => keep,
            };
        }
        best
    }

    /// §2.10: the cheapest eligible type of `lists[list]` not at capacity.
    fn available_type(&mut self, list: u32) -> Option<TypeId> {
        let (a, b) = self.lists[list as usize].types;
        for n in a..b {
            let t = &self.list_types[n];
            let k = self.pass_key[t.0 as usize];
            if self.atcapacity[k] {
                continue;
            }
            if self.pool_at_capacity[t.0 as usize] {
                self.atcapacity[k] = true;
                continue;
            }
            return Some(*t);
        }
        None
    }

    fn reserve(&mut self, i: usize, need: &Resources) {
        let inst = &mut self.insts[i];
        inst.remaining.sub(need);
        inst.count += 1;
        self.refresh(i);
    }

    /// A container starts on instance `i`.
    fn start(&mut self, i: usize) {
        self.insts[i].state = WorkerState::Running;
        self.refresh(i);
    }

    /// The pool's `Create` gate (reference-workers.md §1.7), in its order.
    fn try_create(&mut self, t: TypeId) -> Result<(), bool> {
        let p = &self.snap.pool;
        if p.create_blocked
            || self.create_throttled
            || self.pool_at_capacity[t.0 as usize]
            || self.at_quota()
        {
            return Err(false);
        }
        if p.max_concurrent_creates > 0 && self.creating >= p.max_concurrent_creates {
            self.create_throttled = true;
            return Err(true);
        }
        self.creating += 1;
        self.instance_count += 1;
        Ok(())
    }

    fn insert_instance(&mut self, t: TypeId, need: &Resources) {
        let it = self.snap.types.get(t);
        self.inserts += 1;
        let key = InstKey {
            price: it.price,
            vcpus: it.vcpus,
            ram: it.ram,
            scratch: it.scratch,
            id: "",
            tie: -(self.inserts as i64),
        };
        let mut remaining = it.capacity();
        remaining.sub(need);
        let idx = self.insts.len();
        let ti = t.0 as usize;
        self.insts.push(Inst {
            id: "",
            type_id: Some(t),
            state: WorkerState::Booting,
            behavior: IdleBehavior::Run,
            count: 1,
            remaining,
            key,
            slot: None,
        });
        let leaf = self.leaf(idx);
        let c = &mut self.cands[ti];
        let pos = c.created_tree.push(leaf);
        c.created.push(idx);
        self.insts[idx].slot = Some(Slot {
            type_index: ti,
            created: true,
            pos,
        });
    }
}

/// The last fields of `keys` (indices) in key order. The keys are unique.
fn sorted_indices(
    mut keys: Vec<(u8, u64, u64, usize)>,
    index_bound: usize,
) -> impl Iterator<Item = usize> {
    // Packed into one u128 when the fields fit (2 + 64 bits, then the time and the index in
    // 62 bits, as with millisecond times of this era), which sorts faster. Same order.
    // `index_bound`: every index is below it.
    debug_assert!(keys.iter().all(|k| k.3 < index_bound));
    let index_bits = usize::BITS - index_bound.leading_zeros();
    let time_bits = 62u32.saturating_sub(index_bits);
    let max_time = keys.iter().map(|k| k.2).max().unwrap_or(0);
    let packed: Vec<u128> = if index_bits < 62 && max_time >> time_bits == 0 {
        // Bucketed by class first (a stable counting sort), then each bucket sorted. The keys
        // come in UUID order, and UUIDs are handed out in arrival order, so within a class of
        // equal priority they usually arrive in first-seen order already: the stable sort
        // finds that one run in a single sweep instead of sorting from scratch every pass.
        let mut counts = [0usize; 4];
        for k in &keys {
            counts[usize::from(k.0 & 3)] += 1;
        }
        let mut starts = [0usize; 4];
        for c in 1..4 {
            starts[c] = starts[c - 1] + counts[c - 1];
        }
        let bounds = starts;
        let mut packed: Vec<u128> = vec![0; keys.len()];
        for &(class, priority, time, i) in &keys {
            let slot = &mut starts[usize::from(class & 3)];
            packed[*slot] = (u128::from(class) << 126)
                | (u128::from(priority) << 62)
                | (u128::from(time) << index_bits)
                | i as u128;
            *slot += 1;
        }
        for c in 0..4 {
            packed[bounds[c]..bounds[c] + counts[c]].sort();
        }
        keys.clear();
        packed
    } else {
        keys.sort_unstable();
        Vec::new()
    };
    let mask = (1u128 << index_bits) - 1;
    let from_packed = packed.into_iter().map(move |k| (k & mask) as usize);
    let from_keys = keys.into_iter().map(|k| k.3);
    from_packed.chain(from_keys)
}

/// One scheduling pass.
pub fn plan<'a, I: PlanInstance>(snap: &Snapshot<'a, I>, now: Timestamp) -> Plan<'a> {
    let r = snap.running.len();
    let mut st = snap.state;
    // §2.6: the dynamic concurrency limit.
    if snap.last_503 > st.last_503_acted {
        st.last_503_acted = snap.last_503;
        st.max_containers = r.saturating_sub(1).max(1);
    } else if st.max_containers > 0
        && (st.last_503_acted == Timestamp::ZERO || now.since(st.last_503_acted) > QUIET_PERIOD_503)
    {
        st.max_containers = st.max_containers.max(r * 11 / 10 + 1);
    }
    let total = snap.total_instances;
    if st.instances_within_quota > 0 && st.instances_within_quota < total {
        st.instances_within_quota = total;
    }
    let initially_at_quota = snap.pool.quota_error
        || (snap.pool.max_instances > 0 && snap.pool.instance_count >= snap.pool.max_instances);
    if initially_at_quota {
        if st.max_containers == 0 || st.max_containers > total {
            st.max_containers = total.max(1);
        }
        st.instances_within_quota = total;
    } else if st.instances_within_quota > 0 && st.max_containers > st.instances_within_quota + 1 {
        st.max_containers = st.instances_within_quota + 1;
    }
    let max_containers = st.max_containers;
    // §2.7: the supervisor limit.
    let mut max_supervisors = (max_containers as f64 * snap.supervisor_fraction) as usize;
    if max_supervisors < 1 && snap.supervisor_fraction > 0.0 && max_containers > 0 {
        max_supervisors = 1;
    }

    // §2.3–2.4: instances, with remaining capacity. Their containers' needs are read in the
    // queue merge below, from these (UUID, instance) pairs sorted by UUID.
    let nviews = snap.instances.len();
    let mut type_ids: Vec<Option<TypeId>> = Vec::with_capacity(nviews);
    let mut remaining: Vec<Resources> = Vec::with_capacity(nviews);
    // With a runner index, every runner, at `NOWHERE` when its slot names no instance.
    const NOWHERE: usize = usize::MAX;
    let mut placed: Vec<(&'a str, usize)> = Vec::with_capacity(snap.running.len());
    let mut prices: Vec<f64> = Vec::with_capacity(nviews);
    // With a runner index: each slot's position plus one (zero: no instance has the slot).
    let mut pos_of_slot: Vec<u32> = Vec::new();
    // What the instance records below read of each instance, read here in position order
    // (the records are built in key order, which would visit the instances at random).
    let mut reads: Vec<(&'a str, WorkerState, IdleBehavior, usize)> = Vec::with_capacity(nviews);
    for (pos, v) in snap.instances.iter().enumerate() {
        reads.push((v.id(), v.state(), v.idle_behavior(), v.running_count()));
        let (type_id, price) = v.type_and_price(snap.types);
        type_ids.push(type_id);
        prices.push(price);
        remaining.push(type_id.map_or(Resources::FULL, |t| snap.types.get(t).capacity()));
        if snap.indexed.is_some() {
            if let Some(slot) = v.slot() {
                let slot = slot as usize;
                if slot >= pos_of_slot.len() {
                    pos_of_slot.resize((slot + 1).max(nviews), 0);
                }
                pos_of_slot[slot] = u32::try_from(pos + 1).expect("fewer than 2^32 instances");
            }
        } else {
            for uuid in v.running_uuids() {
                placed.push((uuid, pos));
            }
        }
    }
    match snap.indexed {
        // Already in UUID order, one instance each.
        Some(x) => {
            debug_assert!(
                snap.running.len() == x.runners.len() + x.exited.len()
                    && snap.running.iter().all(|(u, t)| match t {
                        None => x.runners.contains_key(u),
                        Some(t) => x.exited.get(u) == Some(t),
                    }),
                "Running() is the runners and the exit placeholders"
            );
            placed.extend(x.runners.iter().map(|(uuid, at)| {
                let pos = pos_of_slot
                    .get(at.slot as usize)
                    .and_then(|&p| (p as usize).checked_sub(1))
                    .unwrap_or(NOWHERE);
                debug_assert!(pos == NOWHERE || snap.instances[pos].id() == &*at.id);
                (uuid.as_str(), pos)
            }));
        }
        // Pushed in position order, so the stable sort breaks ties by position.
        None => sort_by_str_key(&mut placed, |p| p.0),
    }
    let mut missing = vec![false; nviews];

    // §2.5, first half: one merge, in UUID order, of the queue with `Running()` and with the
    // instances' containers copies what the pass reads of each entry into a row. It reads only
    // the map's nodes: the entries keep copies of what a pass reads of their records.
    let n = snap.queue.len();
    let mut rows: Vec<Row<'a>> = Vec::with_capacity(n);
    // Every entry in UUID order (the rows' order) with its status and its rank.
    let mut entries: Vec<(&'a Key, Status, Rank)> = Vec::with_capacity(n);
    // The sort keys of the entries with no `Running()` entry, which the pass visits in order:
    // the others, which rank before them all, it only counts (and gives their status here).
    // Locked first, then higher priority, then first seen; the UUID (the row index) makes
    // the order total.
    let mut keys: Vec<(u8, u64, u64, usize)> = Vec::with_capacity(n);
    let mut running_supervisors = 0usize;
    // `Running()`: read whole, or (with a runner index) as the runners, which `placed`
    // holds, and the exit placeholders.
    static NO_RUNNING: BTreeMap<Key, Option<Timestamp>> = BTreeMap::new();
    static NO_EXITS: BTreeMap<Key, Timestamp> = BTreeMap::new();
    let (running, exited) = match snap.indexed {
        Some(x) => (&NO_RUNNING, x.exited),
        None => (snap.running, &NO_EXITS),
    };
    let mut runs = running.iter().peekable();
    let mut exits = exited.iter().peekable();
    let indexed = snap.indexed.is_some();
    let mut on_instances = placed.iter().peekable();
    let mut sync = SyncFacts::default();
    // The entries that wait unless the pass starts them: (row, created_at).
    let mut waiting: Vec<(usize, Timestamp)> = Vec::new();
    for (uuid, e) in snap.queue {
        debug_assert_eq!(*uuid, e.container().uuid, "the queue is keyed by UUID");
        while let Some((u, _)) = runs.next_if(|(u, _)| *u < uuid) {
            sync.strays.push(u);
        }
        // `Running()`'s entry: `Some(None)` for a live runner, `Some(Some(t))` for an exit.
        let mut exit = runs.next_if(|(u, _)| *u == uuid).map(|(_, t)| *t);
        while let Some((u, _)) = exits.next_if(|(u, _)| *u < uuid) {
            sync.strays.push(u);
        }
        if let Some((_, t)) = exits.next_if(|(u, _)| *u == uuid) {
            exit = Some(Some(*t));
        }
        while let Some(&&(u, pos)) = on_instances.peek() {
            match str_cmp(u, uuid) {
                Ordering::Less => {
                    if pos != NOWHERE {
                        missing[pos] = true;
                    }
                    if indexed {
                        sync.strays.push(u);
                    }
                }
                Ordering::Equal => {
                    if indexed {
                        exit = Some(None);
                    }
                    if pos != NOWHERE {
                        remaining[pos].sub(&e.resources);
                    }
                }
                Ordering::Greater => break,
            }
            on_instances.next();
        }
        let run = match exit {
            None => Run::Not,
            Some(None) => Run::Live,
            Some(Some(_)) => Run::Exited,
        };
        let (state, priority) = (e.state(), e.priority());
        let suspect = priority == 0
            || match state {
                ContainerState::Running => run != Run::Live,
                ContainerState::Queued => run != Run::Not,
                ContainerState::Locked => run == Run::Exited,
                ContainerState::Complete | ContainerState::Cancelled => true,
            };
        if suspect {
            sync.suspects.push((uuid, exit));
        } else if run == Run::Not
            && priority > 0
            && matches!(state, ContainerState::Queued | ContainerState::Locked)
        {
            waiting.push((rows.len(), e.created_at()));
        }
        // Running first, then Locked, then higher priority, then first seen.
        let class = (u8::from(run == Run::Not) << 1) | u8::from(state != ContainerState::Locked);
        // Descending priority: flip the sign bit for an unsigned order, then invert.
        let sort_priority = !((priority as u64) ^ (1 << 63));
        let rank = Rank(class, sort_priority, e.first_seen_at.0);
        let status = if run == Run::Not {
            keys.push((class, sort_priority, e.first_seen_at.0, rows.len()));
            Status::None
        } else {
            running_supervisors += usize::from(e.supervisor());
            if matches!(state, ContainerState::Queued | ContainerState::Locked) {
                Status::Preparing
            } else {
                Status::None
            }
        };
        entries.push((uuid, status, rank));
        rows.push(Row {
            e,
            run,
            key: uuid,
            state,
            positive: priority >= 1,
            supervisor: e.supervisor(),
        });
    }
    sync.strays.extend(runs.map(|(u, _)| u.as_str()));
    sync.strays.extend(exits.map(|(u, _)| u.as_str()));
    // Containers not in the queue: the instance counts as full.
    for &(u, pos) in on_instances {
        if pos != NOWHERE {
            missing[pos] = true;
        }
        if indexed {
            sync.strays.push(u);
        }
    }
    // With a runner index the strays come from two ordered lists (runners, placeholders).
    if indexed {
        sync.strays.sort_unstable();
    }

    // The instances' sort key's type-decided prefix, by position.
    let prefixes: Vec<(f64, i64, i64, i64)> = type_ids
        .iter()
        .zip(&prices)
        .map(|(type_id, &price)| {
            let it = type_id.map(|t| snap.types.get(t));
            (
                price,
                it.map_or(0, |t| t.vcpus),
                it.map_or(0, |t| t.ram),
                it.map_or(0, |t| t.scratch),
            )
        })
        .collect();
    // Positions in key order. The instances come in ID order (the snapshot's contract), and
    // `tie` is their position, so the key's ID-then-position tie-break is the position alone:
    // a stable order by the prefix (counted, see `stable_order_by_prefix`) gives the same
    // order without comparing IDs. Checked, unless the pool vouches for the order (it lists
    // its ID-ordered map). Ordering positions rather than the rows moves a word per step
    // instead of a row.
    let sorted = || reads.windows(2).all(|w| str_cmp(w[0].0, w[1].0).is_le());
    let vouched = snap.indexed.is_some_and(|x| x.instances_sorted);
    debug_assert!(
        !vouched || sorted(),
        "instances vouched for as sorted are sorted"
    );
    let order: Vec<usize> = if vouched || sorted() {
        stable_order_by_prefix(&prefixes)
    } else {
        let mut order: Vec<usize> = (0..nviews).collect();
        order.sort_by(|&a, &b| {
            prefix_cmp(prefixes[a], prefixes[b])
                .then_with(|| str_cmp(snap.instances[a].id(), snap.instances[b].id()))
                .then(a.cmp(&b))
        });
        order
    };
    // Room for the instances this pass may create, so that the first create does not move
    // every instance: at most the creates the concurrency limit leaves, else a few dozen
    // before the vector grows.
    let p = &snap.pool;
    let headroom = if p.max_concurrent_creates > 0 {
        p.max_concurrent_creates.saturating_sub(p.creating)
    } else {
        64
    };
    let mut insts: Vec<Inst<'a>> = Vec::with_capacity(nviews + headroom);
    for pos in order {
        let (id, state, behavior, count) = reads[pos];
        let (price, vcpus, ram, scratch) = prefixes[pos];
        insts.push(Inst {
            id,
            type_id: type_ids[pos],
            state,
            behavior,
            count,
            remaining: if missing[pos] {
                Resources::FULL
            } else {
                remaining[pos]
            },
            key: InstKey {
                price,
                vcpus,
                ram,
                scratch,
                id,
                tie: pos as i64,
            },
            slot: None,
        });
    }
    let ntypes = snap.types.len();
    let mut existing: Vec<Vec<usize>> = vec![Vec::new(); ntypes];
    let mut uniform = vec![true; ntypes];
    for (i, inst) in insts.iter_mut().enumerate() {
        if let Some(t) = inst.type_id
            && inst.behavior == IdleBehavior::Run
            && inst.state != WorkerState::Shutdown
        {
            let ti = t.0 as usize;
            inst.slot = Some(Slot {
                type_index: ti,
                created: false,
                pos: existing[ti].len(),
            });
            existing[ti].push(i);
            uniform[ti] &= inst.key.price.total_cmp(&snap.types.get(t).price) == Ordering::Equal;
        }
    }
    let mut pass_keys: BTreeMap<(&str, bool), usize> = BTreeMap::new();
    let mut pass_key = Vec::with_capacity(ntypes);
    let mut pool_at_capacity = Vec::with_capacity(ntypes);
    for (_, it) in snap.types.iter() {
        let n = pass_keys.len();
        pass_key.push(
            *pass_keys
                .entry((it.provider_type.as_str(), it.preemptible))
                .or_insert(n),
        );
        let blocked = &snap.pool.capacity_blocked;
        pool_at_capacity.push(
            blocked.contains("")
                || blocked.contains(&it.quota_group)
                || blocked.contains(&it.capacity_key()),
        );
    }
    let mut pass = Pass {
        snap,
        existing: insts.len(),
        cands: Vec::with_capacity(ntypes),
        insts,
        uniform,
        lists: Vec::new(),
        list_ids: Table::default(),
        list_types: Vec::new(),
        inserts: 0,
        found: Vec::new(),
        atcapacity: vec![false; pass_keys.len()],
        pass_key,
        pool_at_capacity,
        instance_count: snap.pool.instance_count,
        creating: snap.pool.creating,
        create_throttled: false,
    };
    for (ti, list) in existing.into_iter().enumerate() {
        // Room for the tree's padding, so that `CandTree::new` does not move the leaves.
        let mut leaves: Vec<Option<Leaf>> = Vec::with_capacity(list.len().next_power_of_two());
        leaves.extend(list.iter().map(|&i| pass.leaf(i)));
        // Where this type's created instances go: they sort before any existing instance
        // with the same key prefix (their ID is "" and their `tie` negative).
        let it = snap.types.get(TypeId(ti as u32));
        let created = InstKey {
            price: it.price,
            vcpus: it.vcpus,
            ram: it.ram,
            scratch: it.scratch,
            id: "",
            tie: -1,
        };
        let split = list.partition_point(|&i| pass.insts[i].key.cmp(&created) == Ordering::Less);
        pass.cands.push(Cands {
            existing_tree: CandTree::new(leaves, 1),
            existing: list,
            split,
            created: Vec::new(),
            created_tree: CandTree::new(Vec::new(), 1),
        });
    }

    // §2.5, second half: the order of the entries with no `Running()` entry, as indices of
    // `rows` (the rows stay where they are). Those with one come first, in an order only
    // the published queue needs (`Plan::queue` sorts them when asked).
    let order: Vec<usize> = sorted_indices(keys, n).collect();

    let mut actions = Vec::with_capacity(order.len());
    let mut create_attempts = Vec::new();
    let mut hit_create_limit = false;
    let mut overquota: Option<usize> = None;
    let mut overmaxsuper: Vec<usize> = Vec::new();
    let mut allocated_not_started = 0usize;
    let mut trying = r;
    let mut qpos = 0usize;
    let mut supervisors = running_supervisors;

    'rows: for (i, &ri) in order.iter().enumerate() {
        let row = &rows[ri];
        debug_assert_eq!(row.run, Run::Not, "entries in Running() are not visited");
        let status = &mut entries[ri].1;
        let uuid = || row.key.as_str();
        let supervisor = row.supervisor;
        if supervisor {
            supervisors += 1;
        }
        if !row.positive {
            *status = Status::PriorityZero(row.state);
            continue;
        }
        if supervisor && max_supervisors > 0 && supervisors > max_supervisors {
            overmaxsuper.push(i);
            *status = Status::SupervisorLimit(overmaxsuper.len());
            continue;
        }
        let live_runner = row.run == Run::Live;
        match row.state {
            ContainerState::Queued => {
                if max_containers > 0 && trying >= max_containers {
                    continue;
                }
                trying += 1;
                let list = pass.list(&row.e.types);
                let best = pass.find_best(row, list);
                if best.is_none() && pass.at_quota() {
                    overquota = Some(i);
                    break 'rows;
                }
                if best.is_none() && pass.available_type(list).is_none() {
                    continue;
                }
                if live_runner {
                    actions.push(Action::Kill {
                        uuid: uuid().to_string(),
                        reason: "about to lock",
                    });
                    continue;
                }
                actions.push(Action::Lock(uuid().to_string()));
                if let Some(b) = best {
                    pass.reserve(b, &row.e.resources);
                }
            }
            ContainerState::Locked => {
                if max_containers > 0 && trying >= max_containers {
                    continue;
                }
                trying += 1;
                let list = pass.list(&row.e.types);
                if let Some(b) = pass.find_best(row, list) {
                    pass.reserve(b, &row.e.resources);
                    let inst = &pass.insts[b];
                    let type_id = inst.type_id.expect("candidates have a configured type");
                    if inst.id.is_empty() || !inst.ready() {
                        *status = Status::WaitingNewInstance(type_id);
                        allocated_not_started += 1;
                    } else if live_runner {
                        actions.push(Action::Kill {
                            uuid: uuid().to_string(),
                            reason: "about to start",
                        });
                        *status = Status::WaitingPreviousAttempt;
                    } else if inst.behavior == IdleBehavior::Run {
                        actions.push(Action::Start {
                            instance: inst.id.to_string(),
                            uuid: uuid().to_string(),
                        });
                        pass.start(b);
                        *status = Status::Preparing;
                    } else {
                        *status = Status::WaitingNewInstance(type_id);
                        allocated_not_started += 1;
                    }
                    continue;
                }
                if pass.at_quota() {
                    overquota = Some(i);
                    break 'rows;
                }
                let Some(t) = pass.available_type(list) else {
                    qpos += 1;
                    *status = Status::WaitingInstanceType(qpos);
                    continue;
                };
                match pass.try_create(t) {
                    Ok(()) => {
                        create_attempts.push((t, true));
                        actions.push(Action::Create {
                            type_id: t,
                            uuid: uuid().to_string(),
                        });
                        *status = Status::WaitingNewInstance(t);
                        allocated_not_started += 1;
                        pass.insert_instance(t, &row.e.resources);
                    }
                    Err(limit) => {
                        create_attempts.push((t, false));
                        hit_create_limit |= limit;
                    }
                }
            }
            _ => {}
        }
    }

    let overquota_len = overquota.map_or(0, |i| order.len() - i);
    // §2.13: generic statuses, numbered after the at-capacity ones.
    let at_quota_now = pass.at_quota();
    for &ri in &order {
        let status = &mut entries[ri].1;
        if *status == Status::None
            && matches!(
                rows[ri].state,
                ContainerState::Queued | ContainerState::Locked
            )
        {
            qpos += 1;
            *status = if at_quota_now {
                Status::WaitingCloudResources(qpos)
            } else {
                Status::WaitingClusterCapacity(qpos)
            };
        }
    }
    // Unlocks: every over-supervisor entry; the over-quota ones except the first in line when
    // instances exist (B5 fixed: the first is kept even when it is the only one).
    let mut unlock: Vec<usize> = overmaxsuper.clone();
    if let Some(first) = overquota {
        let skip = usize::from(total > 0);
        unlock.extend((first..order.len()).skip(skip));
    }
    for i in unlock {
        let row = &rows[order[i]];
        if row.state == ContainerState::Locked && row.run == Run::Not {
            actions.push(Action::Unlock(row.key.to_string()));
        }
    }
    if overquota.is_some() {
        for inst in &pass.insts {
            if inst.count == 0
                && !inst.id.is_empty()
                && inst.behavior != IdleBehavior::Hold
                && matches!(inst.state, WorkerState::Booting | WorkerState::Idle)
            {
                actions.push(Action::Shutdown(inst.id.to_string()));
            }
        }
    }

    // A waiting entry is PREPARING exactly when the pass started it.
    sync.oldest_waiting = waiting
        .iter()
        .filter(|(row, _)| entries[*row].1 != Status::Preparing)
        .map(|(_, t)| *t)
        .min();
    Plan {
        entries,
        actions,
        create_attempts,
        hit_create_limit,
        state: st,
        allocated_not_started,
        not_allocated_over_quota: overquota_len + overmaxsuper.len(),
        sync,
    }
}

/// The implementation this module replaced (commit "Core: pure scheduling pass ..."), kept
/// verbatim as the reference the tests compare `plan` with: a plain scan of the candidates
/// per container, BTreeMap lookups, a comparator sort.
#[cfg(test)]
mod reference {
    use std::cmp::Ordering;
    use std::collections::{BTreeMap, BTreeSet};

    use super::{Action, Plan, QUIET_PERIOD_503, Rank, Snapshot, Status, SyncFacts};
    use crate::core::key::Key;
    use crate::core::queue::QueueEntry;
    use crate::core::select::TypeId;
    use crate::core::time::Timestamp;
    use crate::core::types::{ContainerState, IdleBehavior, Resources, WorkerState};

    #[derive(Clone, Copy, Debug)]
    struct InstKey<'a> {
        price: f64,
        vcpus: i64,
        ram: i64,
        scratch: i64,
        id: &'a str,
        tie: i64,
    }

    impl InstKey<'_> {
        fn cmp(&self, o: &InstKey<'_>) -> Ordering {
            self.price
                .total_cmp(&o.price)
                .then(o.vcpus.cmp(&self.vcpus))
                .then(o.ram.cmp(&self.ram))
                .then(o.scratch.cmp(&self.scratch))
                .then_with(|| self.id.cmp(o.id))
                // `tie` is unique: the original position, or a negative insertion number.
                .then(self.tie.cmp(&o.tie))
        }
    }

    #[derive(Clone, Debug)]
    struct Inst<'a> {
        id: &'a str,
        type_id: Option<TypeId>,
        state: WorkerState,
        behavior: IdleBehavior,
        count: usize,
        remaining: Resources,
        key: InstKey<'a>,
    }

    impl Inst<'_> {
        fn ready(&self) -> bool {
            matches!(self.state, WorkerState::Idle | WorkerState::Running)
        }
    }

    struct Pass<'s, 'a> {
        snap: &'s Snapshot<'a>,
        insts: Vec<Inst<'a>>,
        /// Per type: candidate instance indices, in instance order.
        cands: Vec<Vec<usize>>,
        /// Interned eligible-type lists.
        lists: BTreeMap<&'a [TypeId], usize>,
        /// (type list, needs) → generation at which nothing fitted.
        no_fit: BTreeMap<(usize, Resources), u64>,
        generation: u64,
        inserted: i64,
        scratch: Vec<usize>,
        /// Per type: index of its "<ProviderType>, preemptible=<bool>" key.
        pass_key: Vec<usize>,
        /// Per pass key: found at capacity during this pass.
        atcapacity: Vec<bool>,
        /// Per type: the pool's AtCapacity.
        pool_at_capacity: Vec<bool>,
        instance_count: usize,
        creating: usize,
        create_throttled: bool,
    }

    impl<'a> Pass<'_, 'a> {
        fn at_quota(&self) -> bool {
            let p = &self.snap.pool;
            p.quota_error || (p.max_instances > 0 && self.instance_count >= p.max_instances)
        }

        fn alive(&self, i: usize) -> bool {
            let inst = &self.insts[i];
            let limit = self.snap.max_running_per_instance;
            (limit == 0 || inst.count < limit) && inst.remaining.vcpus > 0
        }

        /// §2.9: the best existing instance for `e`, or `None`.
        fn find_best(&mut self, e: &'a QueueEntry) -> Option<usize> {
            let next_id = self.lists.len();
            let list_id = *self.lists.entry(e.types.as_slice()).or_insert(next_id);
            if self.no_fit.get(&(list_id, e.resources)) == Some(&self.generation) {
                return None;
            }
            let mut found = std::mem::take(&mut self.scratch);
            found.clear();
            for t in &e.types {
                let mut list = std::mem::take(&mut self.cands[t.0 as usize]);
                list.retain(|&i| self.alive(i));
                found.extend(
                    list.iter()
                        .copied()
                        .filter(|&i| self.insts[i].remaining.accommodates(&e.resources)),
                );
                self.cands[t.0 as usize] = list;
            }
            if e.types.len() > 1 {
                found.sort_by(|a, b| self.insts[*a].key.cmp(&self.insts[*b].key));
            }
            let mut best: Option<usize> = None;
            for &c in &found {
                best = match best {
                    None => Some(c),
                    Some(b) if self.insts[c].count > self.insts[b].count => Some(c),
                    Some(b) if !self.insts[b].ready() && self.insts[c].ready() => Some(c),
                    keep => keep,
                };
            }
            self.scratch = found;
            if best.is_none() {
                self.no_fit.insert((list_id, e.resources), self.generation);
            }
            best
        }

        /// §2.10: the cheapest eligible type not at capacity.
        fn available_type(&mut self, e: &QueueEntry) -> Option<TypeId> {
            for t in &e.types {
                let k = self.pass_key[t.0 as usize];
                if self.atcapacity[k] {
                    continue;
                }
                if self.pool_at_capacity[t.0 as usize] {
                    self.atcapacity[k] = true;
                    continue;
                }
                return Some(*t);
            }
            None
        }

        fn reserve(&mut self, i: usize, e: &QueueEntry) {
            let inst = &mut self.insts[i];
            inst.remaining.sub(&e.resources);
            inst.count += 1;
        }

        /// The pool's `Create` gate (reference-workers.md §1.7), in its order.
        fn try_create(&mut self, t: TypeId) -> Result<(), bool> {
            let p = &self.snap.pool;
            if p.create_blocked
                || self.create_throttled
                || self.pool_at_capacity[t.0 as usize]
                || self.at_quota()
            {
                return Err(false);
            }
            if p.max_concurrent_creates > 0 && self.creating >= p.max_concurrent_creates {
                self.create_throttled = true;
                return Err(true);
            }
            self.creating += 1;
            self.instance_count += 1;
            Ok(())
        }

        fn insert_instance(&mut self, t: TypeId, e: &QueueEntry) {
            let it = self.snap.types.get(t);
            self.inserted += 1;
            let key = InstKey {
                price: it.price,
                vcpus: it.vcpus,
                ram: it.ram,
                scratch: it.scratch,
                id: "",
                tie: -self.inserted,
            };
            let mut remaining = it.capacity();
            remaining.sub(&e.resources);
            let idx = self.insts.len();
            self.insts.push(Inst {
                id: "",
                type_id: Some(t),
                state: WorkerState::Booting,
                behavior: IdleBehavior::Run,
                count: 1,
                remaining,
                key,
            });
            let list = &mut self.cands[t.0 as usize];
            let pos = list.partition_point(|&i| self.insts[i].key.cmp(&key) == Ordering::Less);
            list.insert(pos, idx);
            self.generation += 1;
        }
    }

    /// One scheduling pass.
    pub fn plan<'a>(snap: &Snapshot<'a>, now: Timestamp) -> Plan<'a> {
        let r = snap.running.len();
        let mut st = snap.state;
        // §2.6: the dynamic concurrency limit.
        if snap.last_503 > st.last_503_acted {
            st.last_503_acted = snap.last_503;
            st.max_containers = r.saturating_sub(1).max(1);
        } else if st.max_containers > 0
            && (st.last_503_acted == Timestamp::ZERO
                || now.since(st.last_503_acted) > QUIET_PERIOD_503)
        {
            st.max_containers = st.max_containers.max(r * 11 / 10 + 1);
        }
        let total = snap.total_instances;
        if st.instances_within_quota > 0 && st.instances_within_quota < total {
            st.instances_within_quota = total;
        }
        let initially_at_quota = snap.pool.quota_error
            || (snap.pool.max_instances > 0 && snap.pool.instance_count >= snap.pool.max_instances);
        if initially_at_quota {
            if st.max_containers == 0 || st.max_containers > total {
                st.max_containers = total.max(1);
            }
            st.instances_within_quota = total;
        } else if st.instances_within_quota > 0 && st.max_containers > st.instances_within_quota + 1
        {
            st.max_containers = st.instances_within_quota + 1;
        }
        let max_containers = st.max_containers;
        // §2.7: the supervisor limit.
        let mut max_supervisors = (max_containers as f64 * snap.supervisor_fraction) as usize;
        if max_supervisors < 1 && snap.supervisor_fraction > 0.0 && max_containers > 0 {
            max_supervisors = 1;
        }

        // §2.3–2.4: instances in order, with remaining capacity.
        let mut insts: Vec<Inst<'a>> = Vec::with_capacity(snap.instances.len());
        for (pos, v) in snap.instances.iter().enumerate() {
            let type_id = snap.types.id(&v.arvados_instance_type);
            let it = type_id.map(|t| snap.types.get(t));
            let mut remaining = it.map(|t| t.capacity()).unwrap_or(Resources::FULL);
            let uuids: &[String] = v.running_container_uuids.as_deref().unwrap_or(&[]);
            for uuid in uuids {
                match snap.queue.get(uuid.as_str()) {
                    Some(e) => remaining.sub(&e.resources),
                    None => {
                        remaining = Resources::FULL;
                        break;
                    }
                }
            }
            insts.push(Inst {
                id: v.instance.as_str(),
                type_id,
                state: v.worker_state,
                behavior: v.idle_behavior,
                count: uuids.len(),
                remaining,
                key: InstKey {
                    price: v.price,
                    vcpus: it.map_or(0, |t| t.vcpus),
                    ram: it.map_or(0, |t| t.ram),
                    scratch: it.map_or(0, |t| t.scratch),
                    id: v.instance.as_str(),
                    tie: pos as i64,
                },
            });
        }
        insts.sort_by(|a, b| a.key.cmp(&b.key));
        let ntypes = snap.types.len();
        let mut cands: Vec<Vec<usize>> = vec![Vec::new(); ntypes];
        for (i, inst) in insts.iter().enumerate() {
            if let Some(t) = inst.type_id
                && inst.behavior == IdleBehavior::Run
                && inst.state != WorkerState::Shutdown
            {
                cands[t.0 as usize].push(i);
            }
        }
        let mut pass_keys: BTreeMap<(&str, bool), usize> = BTreeMap::new();
        let mut pass_key = Vec::with_capacity(ntypes);
        let mut pool_at_capacity = Vec::with_capacity(ntypes);
        for (_, it) in snap.types.iter() {
            let n = pass_keys.len();
            pass_key.push(
                *pass_keys
                    .entry((it.provider_type.as_str(), it.preemptible))
                    .or_insert(n),
            );
            let blocked = &snap.pool.capacity_blocked;
            pool_at_capacity.push(
                blocked.contains("")
                    || blocked.contains(&it.quota_group)
                    || blocked.contains(&it.capacity_key()),
            );
        }
        let mut pass = Pass {
            snap,
            insts,
            cands,
            lists: BTreeMap::new(),
            no_fit: BTreeMap::new(),
            generation: 0,
            inserted: 0,
            scratch: Vec::new(),
            atcapacity: vec![false; pass_keys.len()],
            pass_key,
            pool_at_capacity,
            instance_count: snap.pool.instance_count,
            creating: snap.pool.creating,
            create_throttled: false,
        };

        // §2.5: container order.
        let mut order: Vec<(bool, &'a QueueEntry)> = snap
            .queue
            .values()
            .map(|e| (snap.running.contains_key(e.container().uuid.as_str()), e))
            .collect();
        order.sort_unstable_by(|(ra, a), (rb, b)| {
            rb.cmp(ra)
                .then_with(|| {
                    (b.container().state == ContainerState::Locked)
                        .cmp(&(a.container().state == ContainerState::Locked))
                })
                .then(b.container().priority.cmp(&a.container().priority))
                .then(a.first_seen_at.cmp(&b.first_seen_at))
                // The UUID is unique, so the order is total.
                .then_with(|| a.container().uuid.cmp(&b.container().uuid))
        });

        let mut statuses = vec![Status::None; order.len()];
        let mut actions = Vec::new();
        let mut create_attempts = Vec::new();
        let mut hit_create_limit = false;
        let mut overquota: Option<usize> = None;
        let mut overmaxsuper: Vec<usize> = Vec::new();
        let mut allocated_not_started = 0usize;
        let mut trying = r;
        let mut qpos = 0usize;
        let mut supervisors = 0usize;

        for (i, &(in_running, e)) in order.iter().enumerate() {
            let ctr = e.container();
            let uuid = &ctr.uuid;
            let supervisor = ctr.scheduling_parameters.supervisor;
            if supervisor {
                supervisors += 1;
            }
            if in_running {
                if matches!(ctr.state, ContainerState::Queued | ContainerState::Locked) {
                    statuses[i] = Status::Preparing;
                }
                continue;
            }
            if ctr.priority < 1 {
                statuses[i] = Status::PriorityZero(ctr.state);
                continue;
            }
            if supervisor && max_supervisors > 0 && supervisors > max_supervisors {
                overmaxsuper.push(i);
                statuses[i] = Status::SupervisorLimit(overmaxsuper.len());
                continue;
            }
            let live_runner = snap.running.get(uuid.as_str()).is_some_and(|t| t.is_none());
            match ctr.state {
                ContainerState::Queued => {
                    if max_containers > 0 && trying >= max_containers {
                        continue;
                    }
                    trying += 1;
                    let best = pass.find_best(e);
                    if best.is_none() && pass.at_quota() {
                        overquota = Some(i);
                        break;
                    }
                    if best.is_none() && pass.available_type(e).is_none() {
                        continue;
                    }
                    if live_runner {
                        actions.push(Action::Kill {
                            uuid: uuid.to_string(),
                            reason: "about to lock",
                        });
                        continue;
                    }
                    actions.push(Action::Lock(uuid.to_string()));
                    if let Some(b) = best {
                        pass.reserve(b, e);
                    }
                }
                ContainerState::Locked => {
                    if max_containers > 0 && trying >= max_containers {
                        continue;
                    }
                    trying += 1;
                    if let Some(b) = pass.find_best(e) {
                        pass.reserve(b, e);
                        let inst = &pass.insts[b];
                        let type_id = inst.type_id.expect("candidates have a configured type");
                        if inst.id.is_empty() || !inst.ready() {
                            statuses[i] = Status::WaitingNewInstance(type_id);
                            allocated_not_started += 1;
                        } else if live_runner {
                            actions.push(Action::Kill {
                                uuid: uuid.to_string(),
                                reason: "about to start",
                            });
                            statuses[i] = Status::WaitingPreviousAttempt;
                        } else if inst.behavior == IdleBehavior::Run {
                            actions.push(Action::Start {
                                instance: inst.id.to_string(),
                                uuid: uuid.to_string(),
                            });
                            pass.insts[b].state = WorkerState::Running;
                            statuses[i] = Status::Preparing;
                        } else {
                            statuses[i] = Status::WaitingNewInstance(type_id);
                            allocated_not_started += 1;
                        }
                        continue;
                    }
                    if pass.at_quota() {
                        overquota = Some(i);
                        break;
                    }
                    let Some(t) = pass.available_type(e) else {
                        qpos += 1;
                        statuses[i] = Status::WaitingInstanceType(qpos);
                        continue;
                    };
                    match pass.try_create(t) {
                        Ok(()) => {
                            create_attempts.push((t, true));
                            actions.push(Action::Create {
                                type_id: t,
                                uuid: uuid.to_string(),
                            });
                            statuses[i] = Status::WaitingNewInstance(t);
                            allocated_not_started += 1;
                            pass.insert_instance(t, e);
                        }
                        Err(limit) => {
                            create_attempts.push((t, false));
                            hit_create_limit |= limit;
                        }
                    }
                }
                _ => {}
            }
        }

        let overquota_len = overquota.map_or(0, |i| order.len() - i);
        // §2.13: generic statuses, numbered after the at-capacity ones.
        let at_quota_now = pass.at_quota();
        for (i, (_, e)) in order.iter().enumerate() {
            if statuses[i] == Status::None
                && matches!(
                    e.container().state,
                    ContainerState::Queued | ContainerState::Locked
                )
            {
                qpos += 1;
                statuses[i] = if at_quota_now {
                    Status::WaitingCloudResources(qpos)
                } else {
                    Status::WaitingClusterCapacity(qpos)
                };
            }
        }
        // Unlocks: every over-supervisor entry; the over-quota ones except the first in line when
        // instances exist (B5 fixed: the first is kept even when it is the only one).
        let mut unlock: Vec<usize> = overmaxsuper.clone();
        if let Some(first) = overquota {
            let skip = usize::from(total > 0);
            unlock.extend((first..order.len()).skip(skip));
        }
        for i in unlock {
            let (in_running, e) = order[i];
            if e.container().state == ContainerState::Locked && !in_running {
                actions.push(Action::Unlock(e.container().uuid.to_string()));
            }
        }
        if overquota.is_some() {
            for inst in &pass.insts {
                if inst.count == 0
                    && !inst.id.is_empty()
                    && inst.behavior != IdleBehavior::Hold
                    && matches!(inst.state, WorkerState::Booting | WorkerState::Idle)
                {
                    actions.push(Action::Shutdown(inst.id.to_string()));
                }
            }
        }

        let sync = sync_facts(snap, &actions);
        // In UUID order, ranked by position.
        let mut entries: Vec<(&Key, Status, Rank)> = order
            .into_iter()
            .zip(statuses)
            .enumerate()
            .map(|(pos, ((_, e), st))| (&e.container().uuid, st, Rank(0, 0, pos as u64)))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        Plan {
            entries,
            actions,
            create_attempts,
            hit_create_limit,
            state: st,
            allocated_not_started,
            not_allocated_over_quota: overquota_len + overmaxsuper.len(),
            sync,
        }
    }

    /// `SyncFacts` by definition: a lookup per entry in `Running()`, the started entries
    /// taken from the actions.
    fn sync_facts<'a>(snap: &Snapshot<'a>, actions: &[Action]) -> SyncFacts<'a> {
        let started: BTreeSet<&str> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { uuid, .. } => Some(uuid.as_str()),
                _ => None,
            })
            .collect();
        let mut f = SyncFacts::default();
        for (uuid, e) in snap.queue {
            let proc = snap.running.get(uuid).copied();
            let (state, priority) = (e.container().state, e.container().priority);
            let left_alone = priority != 0
                && matches!(
                    (state, proc),
                    (ContainerState::Running, Some(None))
                        | (ContainerState::Queued, None)
                        | (ContainerState::Locked, None | Some(None))
                );
            if !left_alone {
                f.suspects.push((uuid, proc));
            } else if proc.is_none()
                && priority > 0
                && matches!(state, ContainerState::Queued | ContainerState::Locked)
                && !started.contains(uuid.as_str())
            {
                let t = e.container().created_at;
                f.oldest_waiting = Some(f.oldest_waiting.map_or(t, |o| o.min(t)));
            }
        }
        f.strays = snap
            .running
            .keys()
            .filter(|u| !snap.queue.contains_key(*u))
            .map(|u| u.as_str())
            .collect();
        f
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::core::rng::Rng;
    use crate::core::types::{Container, InstanceType};

    const GIB: i64 = 1 << 30;

    fn pick<T: Clone>(rng: &mut Rng, xs: &[T]) -> T {
        xs[rng.below(xs.len() as u64) as usize].clone()
    }

    /// Everything a random snapshot borrows.
    struct World {
        table: TypeTable,
        queue: BTreeMap<Key, QueueEntry>,
        running: BTreeMap<Key, Option<Timestamp>>,
        instances: Vec<InstanceView>,
        pool: PoolLimits,
        state: SchedState,
        last_503: Timestamp,
        max_running: usize,
        fraction: f64,
    }

    /// A random world of up to `n` containers and `m` instances, built to reach the corners
    /// of the pass: types with equal keys, instances whose price is not their type's, pending
    /// creates, unknown types and containers, shared VCPUs, per-instance limits, quotas,
    /// capacity errors, create limits, 503s, supervisors, equal priorities and times.
    fn world(seed: u64, n: usize, m: usize) -> World {
        let mut rng = Rng::new(seed);
        // Dense worlds: few types, small containers, instances that still have room and run
        // varied numbers of containers (the §2.9 choice then has much to compare).
        let dense = rng.below(2) == 0;
        let mut types = BTreeMap::new();
        let ntypes = 1 + rng.below(if dense { 3 } else { 8 }) as usize;
        let prices = [0.1, 0.2, 0.3, 0.45, 0.6, 1.0];
        for k in 0..ntypes {
            let vcpus = if dense {
                pick(&mut rng, &[2, 4, 8])
            } else {
                pick(&mut rng, &[1, 2, 4, 8, 16])
            };
            let mut it = InstanceType {
                name: format!("t{k}"),
                provider_type: pick(&mut rng, &["p1", "p2", "p3"]).to_string(),
                vcpus,
                ram: vcpus * pick(&mut rng, &[1, 2, 4]) * GIB,
                scratch: pick(&mut rng, &[10, 50, 100]) * GIB,
                price: pick(&mut rng, &prices),
                preemptible: rng.below(4) == 0,
                quota_group: pick(&mut rng, &["", "g1"]).to_string(),
                ..InstanceType::default()
            };
            if rng.below(4) == 0 {
                it.gpu.device_count = 1;
                it.gpu.vram = 8 * GIB;
            }
            // Sometimes a twin of an earlier type: the same key prefix.
            if k > 0 && rng.below(5) == 0 {
                let twin: &InstanceType = &types[&format!("t{}", rng.below(k as u64))];
                it.vcpus = twin.vcpus;
                it.ram = twin.ram;
                it.scratch = twin.scratch;
                it.price = twin.price;
            }
            types.insert(it.name.clone(), it);
        }
        let table = TypeTable::new(&types);
        let names: Vec<String> = types.keys().cloned().collect();

        let mut queue: BTreeMap<Key, QueueEntry> = BTreeMap::new();
        let nq = rng.below(n as u64 + 1) as usize;
        while queue.len() < nq {
            let uuid = format!("zzzzz-dz642-{:015}", rng.below(1_000_000));
            let state = pick(
                &mut rng,
                &[
                    ContainerState::Queued,
                    ContainerState::Queued,
                    ContainerState::Locked,
                    ContainerState::Running,
                ],
            );
            let mut c = Container {
                uuid: uuid.as_str().into(),
                state,
                priority: pick(&mut rng, &[0, 1, 1, 2, 5, 10, 1000, -3, i64::MAX, i64::MIN]),
                ..Container::default()
            };
            c.scheduling_parameters.supervisor = rng.below(6) == 0;
            let resources = if dense {
                Resources {
                    vcpus: pick(&mut rng, &[0, 1, 1, 1, 2]),
                    ram: rng.below(8) as i64 * (GIB / 4),
                    scratch: pick(&mut rng, &[0, GIB]),
                    gpus: 0,
                    gpu_vram: 0,
                    shared_vcpu_used: false,
                }
            } else {
                Resources {
                    vcpus: pick(&mut rng, &[0, 1, 1, 2, 3, 4, 8]),
                    ram: rng.below(8 * 4) as i64 * (GIB / 4),
                    scratch: pick(&mut rng, &[0, GIB, 20 * GIB, 60 * GIB]),
                    gpus: i64::from(rng.below(5) == 0),
                    gpu_vram: pick(&mut rng, &[0, 4 * GIB]),
                    shared_vcpu_used: false,
                }
            };
            let mut eligible: Vec<TypeId> = Vec::new();
            for t in 0..ntypes {
                if rng.below(2) == 0 {
                    eligible.push(TypeId(t as u32));
                }
            }
            // Shuffled: the pass must not rely on the list's order where Go does not.
            for k in (1..eligible.len()).rev() {
                eligible.swap(k, rng.below(k as u64 + 1) as usize);
            }
            if eligible.is_empty() && state != ContainerState::Running {
                eligible.push(TypeId(rng.below(ntypes as u64) as u32));
            }
            let entry = QueueEntry::new(
                std::sync::Arc::new(c),
                resources,
                eligible,
                Timestamp(pick(&mut rng, &[5, 7, 7, 1_700_000_000_000, u64::MAX])),
            );
            queue.insert(uuid.into(), entry);
        }
        let uuids: Vec<String> = queue.keys().map(String::from).collect();

        let mut running = BTreeMap::new();
        for u in &uuids {
            if queue[u.as_str()].state() == ContainerState::Running || rng.below(8) == 0 {
                running.insert(u.into(), pick(&mut rng, &[None, None, Some(Timestamp(3))]));
            }
        }
        // Crunch-runs of containers the queue does not hold, sorting anywhere among its UUIDs.
        for _ in 0..rng.below(4) {
            let u = format!("zzzzz-dz642-{:015}", rng.below(1_000_000));
            if !queue.contains_key(u.as_str()) {
                running.insert(u.into(), None);
            }
        }

        let mut instances = Vec::new();
        let ni = rng.below(m as u64 + 1) as usize;
        for k in 0..ni {
            let name = if rng.below(12) == 0 {
                "gone".to_string()
            } else {
                pick(&mut rng, &names)
            };
            let price = match types.get(&name) {
                Some(it) if rng.below(6) != 0 => it.price,
                _ => pick(&mut rng, &prices),
            };
            let pending = rng.below(10) == 0;
            let mut on: Vec<String> = Vec::new();
            if !uuids.is_empty() {
                for _ in 0..rng.below(if dense { 7 } else { 4 }) {
                    on.push(pick(&mut rng, &uuids));
                }
            }
            if rng.below(15) == 0 {
                // Not in the queue, and sorting anywhere among the queue's UUIDs.
                let u = format!("zzzzz-dz642-{:015}", rng.below(1_000_000));
                if !queue.contains_key(u.as_str()) {
                    on.push(u);
                }
            }
            on.sort();
            on.dedup();
            instances.push(InstanceView {
                instance: if pending {
                    String::new()
                } else {
                    format!("i-{:04}", rng.below(10_000) * 10 + k as u64 % 10)
                },
                address: String::new(),
                price,
                arvados_instance_type: name,
                provider_instance_type: String::new(),
                last_container_uuid: String::new(),
                last_busy: Timestamp::ZERO,
                running_container_uuids: (!pending).then_some(on),
                worker_state: if pending {
                    WorkerState::Booting
                } else {
                    pick(
                        &mut rng,
                        &[
                            WorkerState::Unknown,
                            WorkerState::Booting,
                            WorkerState::Idle,
                            WorkerState::Idle,
                            WorkerState::Running,
                            WorkerState::Running,
                            WorkerState::Shutdown,
                        ],
                    )
                },
                idle_behavior: pick(
                    &mut rng,
                    &[
                        IdleBehavior::Run,
                        IdleBehavior::Run,
                        IdleBehavior::Run,
                        IdleBehavior::Hold,
                        IdleBehavior::Drain,
                    ],
                ),
            });
        }
        // Half the worlds list their instances in ID order, as the pool does (the pass then
        // orders them without comparing IDs); the others in any order.
        if rng.below(2) == 0 {
            instances.sort_by(|a, b| a.instance.cmp(&b.instance));
        }
        let mut capacity_blocked = BTreeSet::new();
        for key in ["", "g1", "p1", "p2-preemptible"] {
            if rng.below(12) == 0 {
                capacity_blocked.insert(key.to_string());
            }
        }
        let pool = PoolLimits {
            quota_error: rng.below(10) == 0,
            max_instances: pick(&mut rng, &[0, 0, ni, ni + 3]),
            instance_count: ni,
            creating: rng.below(3) as usize,
            max_concurrent_creates: pick(&mut rng, &[0, 0, 1, 4]),
            create_blocked: rng.below(10) == 0,
            capacity_blocked,
        };
        World {
            table,
            queue,
            running,
            instances,
            pool,
            state: SchedState {
                max_containers: pick(&mut rng, &[0, 0, 1, 5, 50]),
                last_503_acted: pick(&mut rng, &[Timestamp::ZERO, Timestamp(900)]),
                instances_within_quota: pick(&mut rng, &[0, 0, 2]),
            },
            last_503: pick(
                &mut rng,
                &[Timestamp::ZERO, Timestamp::ZERO, Timestamp(950)],
            ),
            max_running: pick(&mut rng, &[0, 0, 1, 2, 3]),
            fraction: pick(&mut rng, &[0.0, 0.3, 0.5, 1.0]),
        }
    }

    fn snapshot(w: &World) -> Snapshot<'_> {
        Snapshot {
            types: &w.table,
            queue: &w.queue,
            running: &w.running,
            indexed: None,
            instances: &w.instances,
            total_instances: w
                .instances
                .iter()
                .filter(|v| !v.instance.is_empty())
                .count(),
            pool: w.pool.clone(),
            state: w.state,
            last_503: w.last_503,
            max_running_per_instance: w.max_running,
            supervisor_fraction: w.fraction,
        }
    }

    fn assert_same(seed: u64, got: &Plan<'_>, want: &Plan<'_>) {
        let queue = |p: &Plan<'_>| -> Vec<(String, Status)> {
            p.queue()
                .into_iter()
                .map(|(k, st)| (k.to_string(), st))
                .collect()
        };
        assert_eq!(queue(got), queue(want), "order and statuses, seed {seed}");
        assert_eq!(got.actions, want.actions, "actions, seed {seed}");
        assert_eq!(
            got.create_attempts, want.create_attempts,
            "create attempts, seed {seed}"
        );
        assert_eq!(
            got.hit_create_limit, want.hit_create_limit,
            "create limit, seed {seed}"
        );
        assert_eq!(got.state, want.state, "state, seed {seed}");
        assert_eq!(
            got.allocated_not_started, want.allocated_not_started,
            "seed {seed}"
        );
        assert_eq!(
            got.not_allocated_over_quota, want.not_allocated_over_quota,
            "seed {seed}"
        );
        assert_eq!(got.sync, want.sync, "sync facts, seed {seed}");
    }

    /// The counting order is the comparator sort's, with few or many distinct prefixes,
    /// equal ones in any order, and prices that differ only in the sign of zero.
    #[test]
    fn the_counting_order_by_prefix_is_the_stable_sort() {
        let mut rng = Rng::new(7);
        for case in 0..400u64 {
            let n = rng.below(300) as usize;
            let kinds = 1 + rng.below(if case % 4 == 0 { 60 } else { 8 }) as i64;
            let prefixes: Vec<(f64, i64, i64, i64)> = (0..n)
                .map(|_| {
                    let k = rng.below(kinds as u64) as i64;
                    let price = match k % 5 {
                        0 => 0.0,
                        1 => -0.0,
                        _ => (k % 7) as f64 * 0.1,
                    };
                    (price, k % 3, k % 4, k)
                })
                .collect();
            let mut want: Vec<usize> = (0..n).collect();
            want.sort_by(|&a, &b| prefix_cmp(prefixes[a], prefixes[b]));
            assert_eq!(stable_order_by_prefix(&prefixes), want, "case {case}");
        }
    }

    #[test]
    fn plan_matches_the_reference_on_small_random_snapshots() {
        for seed in 0..3000 {
            let w = world(seed, 40, 20);
            let snap = snapshot(&w);
            let now = Timestamp(1000);
            assert_same(seed, &plan(&snap, now), &reference::plan(&snap, now));
        }
    }

    /// An instance view with a slot, as the pool numbers its workers.
    #[derive(Clone, Debug)]
    struct Numbered(InstanceView, Option<u32>);

    impl PlanInstance for Numbered {
        fn id(&self) -> &str {
            self.0.id()
        }
        fn type_name(&self) -> &str {
            self.0.type_name()
        }
        fn price(&self) -> f64 {
            self.0.price()
        }
        fn running_uuids(&self) -> impl Iterator<Item = &str> {
            self.0.running_uuids()
        }
        fn running_count(&self) -> usize {
            self.0.running_count()
        }
        fn state(&self) -> WorkerState {
            self.0.state()
        }
        fn idle_behavior(&self) -> IdleBehavior {
            self.0.idle_behavior()
        }
        fn slot(&self) -> Option<u32> {
            self.1
        }
    }

    /// The pool's runner index and exit placeholders (`Snapshot::indexed`) give the same plan
    /// as reading the instances' containers and `Running()`. The slots are sparse and out of
    /// position order; pending creates have none.
    #[test]
    fn plan_with_a_runner_index_matches_plan_without() {
        let mut compared = 0;
        for seed in 0..3000 {
            let w = world(seed, 40, 20);
            let n = w.instances.len() as u32;
            let numbered: Vec<Numbered> = (0u32..)
                .zip(&w.instances)
                .map(|(pos, v)| Numbered(v.clone(), (!v.id().is_empty()).then(|| 3 * (n - pos))))
                .collect();
            let mut index: BTreeMap<Key, RunnerAt> = BTreeMap::new();
            let mut unique = true;
            for v in &numbered {
                for uuid in v.running_uuids() {
                    let at = RunnerAt {
                        id: v.id().into(),
                        slot: v.slot().expect("instances with runners have IDs"),
                    };
                    unique &= index.insert(uuid.into(), at).is_none();
                }
            }
            // The index holds one instance per container (the pool's invariant); a world
            // with a container on two instances has no such index.
            if !unique {
                continue;
            }
            compared += 1;
            // `Running()` as the pool keeps it: the runners, and exit placeholders for other
            // containers.
            let exited: BTreeMap<Key, Timestamp> = w
                .running
                .iter()
                .filter(|(u, _)| !index.contains_key(*u))
                .map(|(u, t)| (u.clone(), t.unwrap_or(Timestamp(500))))
                .collect();
            let running: BTreeMap<Key, Option<Timestamp>> = index
                .keys()
                .map(|u| (u.clone(), None))
                .chain(exited.iter().map(|(u, t)| (u.clone(), Some(*t))))
                .collect();
            let without = Snapshot {
                running: &running,
                ..snapshot(&w)
            };
            let sorted = w.instances.windows(2).all(|p| p[0].id() <= p[1].id());
            let with = Snapshot {
                types: without.types,
                queue: without.queue,
                running: &running,
                indexed: Some(Indexed {
                    runners: &index,
                    exited: &exited,
                    instances_sorted: sorted,
                }),
                instances: &numbered,
                total_instances: without.total_instances,
                pool: without.pool.clone(),
                state: without.state,
                last_503: without.last_503,
                max_running_per_instance: without.max_running_per_instance,
                supervisor_fraction: without.supervisor_fraction,
            };
            let now = Timestamp(1000);
            assert_same(seed, &plan(&with, now), &plan(&without, now));
        }
        assert!(compared > 500, "only {compared} worlds had a runner index");
    }

    #[test]
    fn plan_matches_the_reference_on_larger_random_snapshots() {
        // Deeper trees, many instances created in one pass (the trees grow), long queues.
        for seed in 0..40 {
            let mut w = world(1_000_000 + seed, 600, 150);
            w.pool.max_concurrent_creates = 0;
            w.pool.quota_error = false;
            w.pool.create_blocked = false;
            w.pool.max_instances = 0;
            let snap = snapshot(&w);
            let now = Timestamp(1000);
            assert_same(seed, &plan(&snap, now), &reference::plan(&snap, now));
        }
    }

    #[test]
    fn plan_matches_the_reference_when_it_creates_many_instances() {
        // Mostly Locked containers and unlimited creates: later containers go to instances
        // created earlier in the same pass, whose order then matters.
        for seed in 0..400 {
            let mut w = world(2_000_000 + seed, 80, 6);
            for e in w.queue.values_mut() {
                let lock = e.state() == ContainerState::Queued && seed % 4 != 0;
                e.modify_container(|c| {
                    if lock {
                        c.state = ContainerState::Locked;
                    }
                    c.priority = c.priority.max(1);
                });
            }
            w.pool = PoolLimits {
                instance_count: w.instances.len(),
                ..PoolLimits::default()
            };
            w.state = SchedState::default();
            let snap = snapshot(&w);
            let now = Timestamp(1000);
            assert_same(seed, &plan(&snap, now), &reference::plan(&snap, now));
        }
    }

    #[test]
    fn bounds_keep_the_order_of_what_they_bound() {
        let xs = [
            i64::MIN,
            -(1 << 40) - 1,
            -(1 << 20),
            -1,
            0,
            1,
            (1 << 20) - 1,
            1 << 20,
            (1 << 20) + 1,
            1 << 52,
            i64::MAX,
        ];
        for &a in &xs {
            for &b in &xs {
                if a >= b {
                    assert!(mib_up(a) >= mib_up(b), "{a} {b}");
                    assert!(sat32(a) >= sat32(b), "{a} {b}");
                }
            }
            if a > 0 {
                assert!(sat32(a) > 0);
            }
        }
    }
}
