//! The scheduler acceptance scenarios of reference-scheduler.md §8 (tests 1–21), each named
//! after its Go test, run against the pure `plan` with a stub pool and queue of the same
//! semantics as the Go fixtures.
#![allow(clippy::field_reassign_with_default)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use arvados_dispatch_cloud::core::Timestamp;
use arvados_dispatch_cloud::core::config::Config;
use arvados_dispatch_cloud::core::key::Key;
use arvados_dispatch_cloud::core::queue::QueueEntry;
use arvados_dispatch_cloud::core::scheduler::{
    Action, Plan, PoolLimits, SchedState, Snapshot, Status, plan,
};
use arvados_dispatch_cloud::core::select::{TypeTable, choose_instance_types, resources_needed};
use arvados_dispatch_cloud::core::types::{
    Container, ContainerState, IdleBehavior, InstanceView, WorkerState,
};
use common::*;

use ContainerState::{Locked, Queued, Running};

const NOW: Timestamp = Timestamp(1_000_000_000);

/// A stub queue and pool, applying a plan's actions the way the Go stubs do.
struct Stub {
    cfg: Config,
    table: TypeTable,
    queue: BTreeMap<Key, QueueEntry>,
    instances: Vec<InstanceView>,
    running: BTreeMap<Key, Option<Timestamp>>,
    quota: usize,
    capacity_blocked: BTreeSet<String>,
    can_create: bool,
    state: SchedState,
    last_503: Timestamp,
    next_id: usize,
    creates: Vec<String>,
    starts: Vec<String>,
    shutdowns: Vec<String>,
    unlocked: Vec<String>,
    locked: Vec<String>,
    kills: Vec<String>,
}

impl Stub {
    fn new(type_ns: &[i64], factor: f64) -> Stub {
        let mut cfg = Config::default();
        cfg.instance_types = types(type_ns);
        cfg.containers.reserve_extra_ram = 0;
        cfg.containers.local_keep_blob_buffers_per_vcpu = 0;
        cfg.containers.maximum_price_factor = factor;
        cfg.cloud_vms.max_instances = 10;
        cfg.cloud_vms.supervisor_fraction = 0.2;
        let table = TypeTable::new(&cfg.instance_types);
        Stub {
            state: SchedState::initial(0, 10),
            cfg,
            table,
            queue: BTreeMap::new(),
            instances: Vec::new(),
            running: BTreeMap::new(),
            quota: 1000,
            capacity_blocked: BTreeSet::new(),
            can_create: true,
            last_503: Timestamp::ZERO,
            next_id: 0,
            creates: Vec::new(),
            starts: Vec::new(),
            shutdowns: Vec::new(),
            unlocked: Vec::new(),
            locked: Vec::new(),
            kills: Vec::new(),
        }
    }

    /// The suite's default: types 1–16, factor unset (1).
    fn suite() -> Stub {
        Stub::new(&(1..=16).collect::<Vec<_>>(), 0.0)
    }

    /// `setupTestPackContainers`: type1 removed, factor 1.5, C1–C4 Locked, 1 VCPU / 1 GiB.
    fn pack() -> Stub {
        let mut s = Stub::new(&(2..=16).collect::<Vec<_>>(), 1.5);
        for k in 1..=4 {
            s.add(container(k, Locked, k as i64, 1, GIB));
        }
        s
    }

    fn add(&mut self, mut c: Container) {
        let types =
            choose_instance_types(&self.table, &self.cfg.containers, &c).expect("satisfiable");
        let resources = resources_needed(&self.cfg.containers, &c);
        c.created_at = NOW;
        self.queue.insert(
            Key::new(&c.uuid),
            QueueEntry::new(c.into(), resources, types, NOW),
        );
    }

    fn vm(&mut self, type_n: i64, state: WorkerState, running: &[usize]) -> String {
        self.next_id += 1;
        let id = format!("i-{:07}", self.next_id);
        let it = self
            .table
            .get(self.table.id(&format!("type{type_n}")).expect("configured"));
        let uuids: Vec<String> = running.iter().map(|k| uuid(*k)).collect();
        for u in &uuids {
            self.running.insert(Key::new(u), None);
        }
        self.instances.push(InstanceView {
            instance: id.clone(),
            address: String::new(),
            price: it.price,
            arvados_instance_type: it.name.clone(),
            provider_instance_type: it.provider_type.clone(),
            last_container_uuid: String::new(),
            last_busy: NOW,
            running_container_uuids: Some(uuids),
            worker_state: state,
            idle_behavior: IdleBehavior::Run,
        });
        id
    }

    fn set(&mut self, id: &str, f: impl FnOnce(&mut InstanceView)) {
        f(self
            .instances
            .iter_mut()
            .find(|v| v.instance == id)
            .expect("instance"));
    }

    /// One pass; applies its actions and returns each container's status.
    fn run(&mut self) -> BTreeMap<String, Status> {
        let snap = Snapshot {
            types: &self.table,
            queue: &self.queue,
            running: &self.running,
            indexed: None,
            instances: &self.instances,
            total_instances: self.instances.len(),
            pool: PoolLimits {
                quota_error: false,
                max_instances: self.quota,
                instance_count: self.instances.len(),
                creating: 0,
                max_concurrent_creates: 0,
                create_blocked: !self.can_create,
                capacity_blocked: self.capacity_blocked.clone(),
            },
            state: self.state,
            last_503: self.last_503,
            max_running_per_instance: self.cfg.cloud_vms.max_running_containers_per_instance,
            supervisor_fraction: self.cfg.cloud_vms.supervisor_fraction,
        };
        let p: Plan<'_> = plan(&snap, NOW);
        let statuses = p
            .queue()
            .into_iter()
            .map(|(k, st)| (k.to_string(), st))
            .collect();
        let (actions, state, attempts) = (p.actions.clone(), p.state, p.create_attempts.clone());
        self.state = state;
        for (t, ok) in &attempts {
            if !ok {
                self.creates.push(format!("{}!", self.table.get(*t).name));
            }
        }
        for a in actions {
            self.apply(a);
        }
        statuses
    }

    fn apply(&mut self, a: Action) {
        match a {
            Action::Lock(u) => {
                self.queue
                    .get_mut(u.as_str())
                    .expect("queued")
                    .modify_container(|c| c.state = Locked);
                self.locked.push(u);
            }
            Action::Unlock(u) => {
                self.queue
                    .get_mut(u.as_str())
                    .expect("locked")
                    .modify_container(|c| c.state = Queued);
                self.unlocked.push(u);
            }
            Action::Start { instance, uuid } => {
                self.set(&instance, |v| {
                    v.running_container_uuids
                        .as_mut()
                        .expect("real")
                        .push(uuid.clone());
                    v.worker_state = WorkerState::Running;
                });
                self.running.insert(Key::new(&uuid), None);
                self.starts.push(uuid);
            }
            Action::Create { type_id, .. } => {
                let n: i64 = self.table.get(type_id).name["type".len()..]
                    .parse()
                    .expect("typeN");
                self.creates.push(format!("type{n}"));
                self.vm(n, WorkerState::Booting, &[]);
            }
            Action::Shutdown(id) => {
                self.set(&id, |v| v.worker_state = WorkerState::Shutdown);
                self.shutdowns.push(id);
            }
            Action::Kill { uuid, .. } => {
                if self.running.get(uuid.as_str()) == Some(&None) {
                    self.running.remove(uuid.as_str());
                }
                self.kills.push(uuid);
            }
        }
    }
}

fn names(ks: &[usize]) -> Vec<String> {
    ks.iter().map(|k| uuid(*k)).collect()
}

fn creates(ns: &[i64]) -> Vec<String> {
    ns.iter().map(|n| format!("type{n}")).collect()
}

#[test]
fn use_idle_workers() {
    let mut s = Stub::suite();
    for k in 1..=4 {
        s.add(container(k, Locked, k as i64, 1, GIB));
    }
    let t1 = s.vm(1, WorkerState::Idle, &[]);
    s.vm(2, WorkerState::Idle, &[]);
    s.vm(2, WorkerState::Idle, &[]);
    s.run();
    assert_eq!(s.starts, names(&[4]));
    assert_eq!(s.creates, creates(&[1, 1, 1]));
    assert!(
        s.instances
            .iter()
            .find(|v| v.instance == t1)
            .expect("vm")
            .running_container_uuids
            .as_ref()
            .expect("real")
            .contains(&uuid(4))
    );
}

#[test]
fn pack_containers_new_instance() {
    let mut s = Stub::pack();
    s.quota = 999;
    s.run();
    assert_eq!(s.creates, creates(&[2, 2]));
    assert!(s.starts.is_empty());
}

#[test]
fn pack_containers_idle_instance() {
    let mut s = Stub::pack();
    s.vm(3, WorkerState::Idle, &[]);
    s.run();
    assert_eq!(s.starts, names(&[4, 3, 2]));
    assert_eq!(s.creates, creates(&[2]));
}

#[test]
fn pack_containers_idle_instance_too_big() {
    let mut s = Stub::pack();
    s.vm(4, WorkerState::Idle, &[]);
    s.run();
    assert!(s.starts.is_empty());
    assert_eq!(s.creates, creates(&[2, 2]));
}

#[test]
fn pack_containers_spare_resources() {
    let mut s = Stub::pack();
    s.queue
        .get_mut(uuid(4).as_str())
        .expect("c4")
        .modify_container(|c| c.state = Running);
    s.vm(3, WorkerState::Running, &[4]);
    s.run();
    assert_eq!(s.starts, names(&[3, 2]));
    assert_eq!(s.creates, creates(&[2]));
}

#[test]
fn pack_containers_idle_behavior_hold() {
    let mut s = Stub::pack();
    let id = s.vm(3, WorkerState::Running, &[4]);
    s.set(&id, |v| v.idle_behavior = IdleBehavior::Hold);
    s.run();
    assert!(s.starts.is_empty());
    assert_eq!(s.creates, creates(&[2, 2]));
}

#[test]
fn pack_containers_disabled_in_config() {
    let mut s = Stub::pack();
    s.cfg.cloud_vms.max_running_containers_per_instance = 1;
    s.vm(2, WorkerState::Idle, &[]);
    s.run();
    assert_eq!(s.starts, names(&[4]));
    assert_eq!(s.creates, creates(&[2, 2, 2]));
}

#[test]
fn pack_containers_limited_in_config() {
    let mut s = Stub::new(&(8..=16).collect::<Vec<_>>(), 1.5);
    for k in 1..=4 {
        s.add(container(k, Locked, k as i64, 1, GIB));
    }
    s.cfg.cloud_vms.max_running_containers_per_instance = 2;
    s.run();
    assert_eq!(s.creates, creates(&[8, 8]));
    assert!(s.starts.is_empty());
}

#[test]
fn pack_containers_instance_state_unknown() {
    let mut s = Stub::pack();
    let i1 = s.vm(2, WorkerState::Unknown, &[]);
    s.run();
    assert_eq!(s.creates, creates(&[2]));
    assert!(s.starts.is_empty());
    // Pass 2: the new instance is still booting.
    let i2 = s
        .instances
        .iter()
        .find(|v| v.instance != i1)
        .expect("i-2")
        .instance
        .clone();
    s.run();
    assert_eq!(s.creates, creates(&[2]));
    assert!(s.starts.is_empty());
    // Pass 3: it is idle; ready beats unknown, then the busier VM wins.
    s.set(&i2, |v| v.worker_state = WorkerState::Idle);
    s.run();
    assert_eq!(s.starts, names(&[4, 3]));
    assert_eq!(s.creates, creates(&[2]));
    let on_i2 = s
        .instances
        .iter()
        .find(|v| v.instance == i2)
        .expect("i-2")
        .running_container_uuids
        .clone();
    assert_eq!(on_i2, Some(names(&[4, 3])));
}

#[test]
fn pack_containers_resources() {
    let mut s = Stub::new(&[1, 2, 4, 8, 16], 1.0);
    let mut c1 = container(1, Locked, 1, 1, 5 * GIB);
    c1.runtime_constraints.ram = 5 * GIB;
    let c2 = container(2, Locked, 2, 5, 128 * MIB);
    let mut c3 = container(3, Locked, 3, 1, 128 * MIB);
    c3.runtime_constraints.keep_cache_disk = 5 * GIB;
    let c4 = container(4, Locked, 4, 9, 128 * MIB);
    s.add(c1);
    s.add(c2);
    s.add(c3);
    s.add(c4);
    for k in 5..=8 {
        let mut c = container(k, Locked, k as i64, 0, 128 * MIB);
        c.runtime_constraints.keep_cache_disk = 128 * MIB;
        s.add(c);
    }
    s.run();
    assert_eq!(s.creates, creates(&[1, 16, 8]));
    for v in &mut s.instances {
        v.worker_state = WorkerState::Idle;
    }
    s.run();
    let on = |t: &str| {
        s.instances
            .iter()
            .find(|v| v.arvados_instance_type == t)
            .expect("vm")
            .running_container_uuids
            .clone()
            .expect("real")
    };
    assert_eq!(on("type1"), names(&[8, 7, 6, 5]));
    assert_eq!(on("type16"), names(&[4]));
    assert_eq!(on("type8"), names(&[3, 2, 1]));
}

#[test]
fn pack_containers_0_vcpus() {
    let mut s = Stub::new(&(2..=16).collect::<Vec<_>>(), 1.5);
    s.add(container(1, Locked, 1, 1, 128 * MIB));
    for k in 2..=5 {
        s.add(container(k, Locked, k as i64, 0, 128 * MIB));
    }
    s.add(container(6, Locked, 6, 2, 128 * MIB));
    s.run();
    assert_eq!(s.creates, creates(&[2, 2]));
    for v in &mut s.instances {
        v.worker_state = WorkerState::Idle;
    }
    s.run();
    let runs: Vec<Vec<String>> = s
        .instances
        .iter()
        .map(|v| v.running_container_uuids.clone().expect("real"))
        .collect();
    assert_eq!(runs, vec![names(&[6]), names(&[5, 4, 3, 2, 1])]);
}

fn shutdown_at_quota(quota: usize) -> Stub {
    let mut s = Stub::suite();
    s.quota = quota;
    s.vm(2, WorkerState::Idle, &[]);
    s.vm(2, WorkerState::Idle, &[]);
    s.add(container(3, Locked, 3, 1, 3 * GIB));
    s.add(container(2, Locked, 2, 1, 2 * GIB));
    s.run();
    s
}

#[test]
fn shutdown_at_quota_1_and_2() {
    for quota in [1, 2] {
        let s = shutdown_at_quota(quota);
        assert!(s.starts.is_empty(), "quota {quota}");
        assert_eq!(s.shutdowns.len(), 2, "quota {quota}");
        assert!(s.creates.is_empty(), "quota {quota}");
        assert_eq!(
            s.unlocked,
            names(&[2]),
            "quota {quota}: only C2 is unlocked; C3, first in line, stays Locked"
        );
    }
}

#[test]
fn shutdown_at_quota_3() {
    let s = shutdown_at_quota(3);
    assert_eq!(s.creates, creates(&[3]));
    assert_eq!(s.starts, names(&[2]));
    assert!(s.shutdowns.is_empty());
    assert!(s.unlocked.is_empty());
}

#[test]
fn instance_capacity() {
    let mut s = Stub::suite();
    s.capacity_blocked.insert("providertype4".into());
    s.vm(4, WorkerState::Idle, &[]);
    s.add(container(4, Locked, 4, 1, 4 * GIB));
    s.add(container(3, Locked, 3, 1, 4 * GIB));
    s.add(container(2, Queued, 2, 1, 4 * GIB));
    s.add(container(1, Locked, 1, 1, GIB));
    let statuses = s.run();
    let status3 = statuses[&uuid(3)];
    assert_eq!(s.starts, names(&[4]));
    assert_eq!(s.creates, creates(&[1]));
    assert!(s.locked.is_empty(), "C2 is not locked");
    assert!(s.unlocked.is_empty());
    assert!(matches!(status3, Status::WaitingInstanceType(_)));
}

#[test]
fn idle_in_503_quiet_period() {
    let mut s = Stub::suite();
    s.state.max_containers = 3;
    s.state.last_503_acted = NOW;
    s.last_503 = NOW;
    s.vm(2, WorkerState::Running, &[1]);
    s.vm(2, WorkerState::Idle, &[]);
    s.vm(3, WorkerState::Running, &[3]);
    s.vm(3, WorkerState::Idle, &[]);
    s.add(container(1, Running, 1000, 1, 2 * GIB));
    s.add(container(3, Running, 1000, 1, 3 * GIB));
    s.add(container(2, Locked, 1000, 1, 2 * GIB));
    s.add(container(4, Locked, 1000, 1, 3 * GIB));
    s.add(container(5, Queued, 1000, 1, 3 * GIB));
    s.run();
    assert_eq!(s.starts, names(&[2]));
    assert!(s.unlocked.is_empty());
    assert!(s.shutdowns.is_empty());
    assert!(s.locked.is_empty());
    assert!(s.creates.is_empty());
}

#[test]
fn unlock_excess_supervisors() {
    let mut s = Stub::suite();
    for k in 1..=6 {
        let mut c = container(k, Locked, 1000 - k as i64, 1, 2 * GIB);
        c.scheduling_parameters.supervisor = true;
        s.add(c);
    }
    for k in 1..=6 {
        if k <= 4 {
            s.vm(2, WorkerState::Running, &[k]);
        } else {
            s.vm(2, WorkerState::Idle, &[]);
        }
    }
    s.run();
    assert_eq!(s.unlocked, names(&[5, 6]));
    assert!(s.shutdowns.is_empty());
    assert!(s.creates.is_empty());
}

#[test]
fn excess_supervisors() {
    let mut s = Stub::suite();
    s.quota = 16;
    for k in 1..=8 {
        let state = if k == 3 || k == 4 { Locked } else { Queued };
        let mut c = container(k, state, 1000 + k as i64, 1, 2 * GIB);
        c.scheduling_parameters.supervisor = true;
        s.add(c);
    }
    for _ in 0..3 {
        s.vm(2, WorkerState::Idle, &[]);
    }
    s.run();
    assert_eq!(s.starts, names(&[4, 3]));
    assert!(s.shutdowns.is_empty());
    assert!(s.unlocked.is_empty());
    assert!(s.locked.is_empty());
}

#[test]
fn equal_priority_containers() {
    let mut s = Stub::suite();
    s.quota = 2;
    for k in 1..=8 {
        s.add(container(k, Queued, 333, 1, 3 * GIB));
    }
    s.vm(3, WorkerState::Idle, &[]);
    s.vm(3, WorkerState::Idle, &[]);
    for _ in 0..30 {
        s.run();
    }
    assert_eq!(s.starts.len(), 2);
    assert!(s.shutdowns.is_empty());
    let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
    for u in &s.unlocked {
        *counts.entry(u).or_default() += 1;
    }
    assert!(
        counts.values().all(|n| *n <= 1),
        "unlocked more than once: {counts:?}"
    );
}

#[test]
fn start_while_creating() {
    let mut s = Stub::suite();
    s.can_create = false;
    for k in 1..=3 {
        s.add(container(k, Locked, k as i64, 1, GIB));
    }
    for k in 4..=6 {
        s.add(container(k, Locked, k as i64, 1, 2 * GIB));
    }
    s.vm(1, WorkerState::Booting, &[]);
    let i2 = s.vm(1, WorkerState::Idle, &[]);
    s.vm(2, WorkerState::Booting, &[]);
    let i4 = s.vm(2, WorkerState::Idle, &[]);
    s.run();
    assert_eq!(s.starts, names(&[6, 3]));
    assert_eq!(
        s.creates,
        vec!["type2!".to_string(), "type1!".to_string()],
        "C4's and C1's creates fail"
    );
    let on = |id: &str| {
        s.instances
            .iter()
            .find(|v| v.instance == id)
            .expect("vm")
            .running_container_uuids
            .clone()
    };
    assert_eq!(on(&i4), Some(names(&[6])));
    assert_eq!(on(&i2), Some(names(&[3])));
}

#[test]
fn containers_metrics() {
    // Phase 1: at quota with a booting type1 for the Locked C1.
    let mut s = Stub::suite();
    s.quota = 0;
    s.add(container(1, Locked, 1, 1, GIB));
    s.vm(1, WorkerState::Booting, &[]);
    let snap_quota = |s: &Stub| PoolLimits {
        quota_error: true,
        max_instances: 0,
        instance_count: s.instances.len(),
        ..PoolLimits::default()
    };
    let run = |s: &Stub| {
        let snap = Snapshot {
            types: &s.table,
            queue: &s.queue,
            running: &s.running,
            indexed: None,
            instances: &s.instances,
            total_instances: s.instances.len(),
            pool: snap_quota(s),
            state: s.state,
            last_503: Timestamp::ZERO,
            max_running_per_instance: 0,
            supervisor_fraction: 0.2,
        };
        let p = plan(&snap, NOW);
        (
            p.allocated_not_started,
            p.not_allocated_over_quota,
            p.actions.clone(),
        )
    };
    let (alloc, over, _) = run(&s);
    assert_eq!((alloc, over), (1, 0));
    // Phase 2: an empty pool; C1 is over quota and unlocked because there are no instances.
    s.instances.clear();
    let (alloc, over, actions) = run(&s);
    assert_eq!((alloc, over), (0, 1));
    assert_eq!(actions, vec![Action::Unlock(uuid(1))]);
    // Phase 3: an idle type1; C1 starts.
    s.vm(1, WorkerState::Idle, &[]);
    let (alloc, over, actions) = run(&s);
    assert_eq!((alloc, over), (0, 0));
    assert!(matches!(&actions[0], Action::Start { uuid: u, .. } if *u == uuid(1)));
}

#[test]
fn skip_supervisors() {
    let mut s = Stub::suite();
    s.add(container(1, Locked, 1, 1, GIB));
    for k in 2..=4 {
        let mut c = container(k, Locked, k as i64, 1, GIB);
        c.scheduling_parameters.supervisor = true;
        s.add(c);
    }
    for _ in 0..8 {
        s.vm(1, WorkerState::Idle, &[]);
    }
    s.run();
    assert_eq!(s.starts, names(&[4, 3, 1]));
    assert_eq!(s.unlocked, names(&[2]));
}

#[test]
fn status_strings_are_byte_exact() {
    let mut s = Stub::suite();
    s.add(container(1, Queued, 0, 1, GIB));
    let e = s.queue.values().next().expect("entry").clone();
    let t = |st: Status| st.text(&e, &s.table);
    assert_eq!(
        t(Status::Preparing),
        "Container is allocated to an instance and preparing to run."
    );
    assert_eq!(
        t(Status::PriorityZero(Queued)),
        "This container will not be scheduled to run because its priority is 0 and state is Queued."
    );
    assert_eq!(
        t(Status::SupervisorLimit(3)),
        "Waiting in workflow queue at position 3.  Cluster is at capacity and cannot start any new workflows right now."
    );
    assert_eq!(
        t(Status::WaitingPreviousAttempt),
        "Waiting for previous container attempt to exit."
    );
    assert_eq!(
        t(Status::WaitingNewInstance(s.table.id("type1").expect("t1"))),
        "Waiting for a type1 instance to boot and be ready to accept work."
    );
    assert_eq!(
        t(Status::WaitingInstanceType(1)),
        "Waiting in queue at position 1.  Cluster is at capacity for all eligible instance types (type1) and cannot start a new instance right now."
    );
    assert_eq!(
        t(Status::WaitingCloudResources(2)),
        "Waiting in queue at position 2.  Cluster is at cloud account limits and cannot start any new instances right now."
    );
    assert_eq!(
        t(Status::WaitingClusterCapacity(4)),
        "Waiting in queue at position 4.  Cluster is at capacity and cannot start any new instances right now."
    );
    assert_eq!(t(Status::None), "");
}
