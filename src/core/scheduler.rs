//! The scheduling pass (`runQueue`, reference-scheduler.md §2) as a pure function.
//!
//! `plan(&Snapshot, now) -> Plan` reads a snapshot of the queue and the pool and decides, in
//! queue order, which containers to lock, start, create instances for, kill, unlock, and which
//! instances to shut down. It never mutates anything: the pool's answers to `Create`,
//! `StartContainer` and `KillContainer` are modelled from the snapshot (the dispatcher then
//! applies the plan through the real pool, which enforces the same rules). Karpenter calls
//! this split Solve/Record.
//!
//! Cost: O(N log N) for the sort plus, per container, a scan of the instances of its eligible
//! types that still have room. Instances that are full are pruned from per-type candidate
//! lists once, and a "nothing fits" answer is remembered per (eligible types, needs) until an
//! instance is added, so a long queue of similar containers costs O(N) after the sort.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

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
pub struct Snapshot<'a> {
    /// Configured types.
    pub types: &'a TypeTable,
    /// The queue, by UUID.
    pub queue: &'a BTreeMap<String, QueueEntry>,
    /// `Running()`: UUID → exit time (`None` while crunch-run lives).
    pub running: &'a BTreeMap<String, Option<Timestamp>>,
    /// `Instances()`.
    pub instances: &'a [InstanceView],
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

/// The result of one pass.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    /// Entries in scheduling order.
    pub order: Vec<&'a QueueEntry>,
    /// Status of each entry of `order`.
    pub statuses: Vec<Status>,
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

    // §2.3–2.4: instances in order, with remaining capacity.
    let mut insts: Vec<Inst<'a>> = Vec::with_capacity(snap.instances.len());
    for (pos, v) in snap.instances.iter().enumerate() {
        let type_id = snap.types.id(&v.arvados_instance_type);
        let it = type_id.map(|t| snap.types.get(t));
        let mut remaining = it.map(|t| t.capacity()).unwrap_or(Resources::FULL);
        let uuids: &[String] = v.running_container_uuids.as_deref().unwrap_or(&[]);
        for uuid in uuids {
            match snap.queue.get(uuid) {
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
        .map(|e| (snap.running.contains_key(&e.container.uuid), e))
        .collect();
    order.sort_unstable_by(|(ra, a), (rb, b)| {
        rb.cmp(ra)
            .then_with(|| {
                (b.container.state == ContainerState::Locked)
                    .cmp(&(a.container.state == ContainerState::Locked))
            })
            .then(b.container.priority.cmp(&a.container.priority))
            .then(a.first_seen_at.cmp(&b.first_seen_at))
            // The UUID is unique, so the order is total.
            .then_with(|| a.container.uuid.cmp(&b.container.uuid))
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
        let ctr = &e.container;
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
        let live_runner = snap.running.get(uuid).is_some_and(|t| t.is_none());
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
                        uuid: uuid.clone(),
                        reason: "about to lock",
                    });
                    continue;
                }
                actions.push(Action::Lock(uuid.clone()));
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
                            uuid: uuid.clone(),
                            reason: "about to start",
                        });
                        statuses[i] = Status::WaitingPreviousAttempt;
                    } else if inst.behavior == IdleBehavior::Run {
                        actions.push(Action::Start {
                            instance: inst.id.to_string(),
                            uuid: uuid.clone(),
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
                            uuid: uuid.clone(),
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
                e.container.state,
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
        if e.container.state == ContainerState::Locked && !in_running {
            actions.push(Action::Unlock(e.container.uuid.clone()));
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

    Plan {
        order: order.into_iter().map(|(_, e)| e).collect(),
        statuses,
        actions,
        create_attempts,
        hit_create_limit,
        state: st,
        allocated_not_started,
        not_allocated_over_quota: overquota_len + overmaxsuper.len(),
    }
}
