//! Dispatcher-level scenarios (reference-scheduler.md §8 tests 19, 22, 23, 33–36, 39, 40 and
//! reference-workers.md §4.4, §7.7) against a fake controller, cloud and VMs in virtual time.
#![allow(clippy::field_reassign_with_default)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use arvados_dispatch_cloud::core::command::CommandKind;
use arvados_dispatch_cloud::core::config::Config;
use arvados_dispatch_cloud::core::metrics::BootOutcome;
use arvados_dispatch_cloud::core::rng::Rng;
use arvados_dispatch_cloud::core::types::{
    ContainerState, IdleBehavior, InstanceInfo, WorkerState,
};
use arvados_dispatch_cloud::core::{Dispatcher, Timestamp};
use common::world::{ME, Proc, SET_ID, Vm, World, options};
use common::*;

use ContainerState::{Cancelled, Complete, Locked, Queued, Running};

/// The common configuration of `dispatcher_test.go` (reference-workers.md §7.7).
fn go_test_config() -> Config {
    let mut cfg = Config::default();
    cfg.cluster_id = "zzzzz".into();
    cfg.instance_types = types(&[1, 2, 3, 4, 6, 8, 16]);
    let c = &mut cfg.containers;
    c.crunch_run_command = "crunch-run".into();
    c.crunch_run_arguments_list = vec!["--foo".into(), "--extra='args'".into()];
    c.runtime_engine = "stub".into();
    c.stale_lock_timeout = Duration::from_millis(5);
    c.max_dispatch_attempts = 10;
    c.maximum_price_factor = 1.5;
    // The Go test builds its config as a struct literal: keys it does not set are zero.
    c.reserve_extra_ram = 0;
    c.local_keep_blob_buffers_per_vcpu = 0;
    let v = &mut cfg.cloud_vms;
    v.max_concurrent_instance_create_ops = 0;
    v.supervisor_fraction = 0.0;
    v.sync_interval = Duration::from_millis(10);
    v.timeout_idle = Duration::from_millis(150);
    v.timeout_booting = Duration::from_millis(150);
    v.timeout_probe = Duration::from_millis(15);
    v.timeout_shutdown = Duration::from_millis(5);
    v.max_cloud_ops_per_second = 500.0;
    v.initial_quota_estimate = 8;
    v.poll_interval = Duration::from_millis(5);
    v.probe_interval = Duration::from_millis(5);
    v.max_probes_per_second = 1000.0;
    v.timeout_signal = Duration::from_millis(3);
    v.timeout_stale_run_lock = Duration::from_millis(3);
    v.timeout_term = Duration::from_millis(20);
    v.resource_tags = BTreeMap::from([("testtag".to_string(), "test value".to_string())]);
    v.tag_key_prefix = "test:".into();
    v.boot_probe_command = String::new();
    v.deploy_runner_binary = String::new();
    v.max_instances = 0;
    cfg.tuning.schedule_min_interval = Duration::from_millis(1);
    cfg
}

/// A VM left by an earlier dispatcher process, with a crunch-run for each UUID.
fn leftover_vm(w: &mut World, id: &str, type_n: i64, boot_at: Timestamp, procs: &[String]) {
    let tags = BTreeMap::from([
        ("test:InstanceSetID".to_string(), SET_ID.to_string()),
        ("test:InstanceType".to_string(), format!("type{type_n}")),
        ("test:IdleBehavior".to_string(), "run".to_string()),
        ("test:InstanceSecret".to_string(), "0123".to_string()),
    ]);
    let vm = Vm {
        info: InstanceInfo {
            id: id.into(),
            address: String::new(),
            provider_type: format!("providertype{type_n}"),
            tags,
            remote_user: "root".into(),
            ..InstanceInfo::default()
        },
        boot_at,
        broken_at: None,
        report_broken_at: None,
        crunch_run_missing: false,
        crash_rate: 0.0,
        deadlock_rate: 0.0,
        procs: procs
            .iter()
            .map(|u| {
                (
                    u.clone(),
                    Proc {
                        finish_at: Timestamp(u64::MAX / 2),
                        stale_until: None,
                        exited: false,
                        crash_before_running: false,
                    },
                )
            })
            .collect(),
        runner_installed: true,
    };
    w.vms.insert(id.into(), vm);
}

#[test]
fn kill_nonexistent_container() {
    let mut w = World::new(go_test_config(), 1);
    leftover_vm(&mut w, "i-1", 1, Timestamp::ZERO, &[uuid(2)]);
    let done = w.run(Duration::from_secs(2), |w| {
        w.d.pool().loaded() && w.vms["i-1"].procs.is_empty() && w.d.pool().running().is_empty()
    });
    assert!(
        done,
        "the crunch-run of a container not in the queue was killed; Running() is empty"
    );
    assert!(w.commands.iter().any(|c| matches!(&c.kind, CommandKind::Exec { command, .. } if *command == format!("crunch-run --kill 15 {}", uuid(2)))));
}

/// A world where no container can start: MaxInstances 1, and the one instance (which never
/// boots) is on hold. Queued containers are never locked.
fn nowhere_to_run() -> World {
    let mut cfg = go_test_config();
    cfg.cloud_vms.max_instances = 1;
    let mut w = World::new(cfg, 2);
    leftover_vm(&mut w, "i-1", 16, Timestamp(u64::MAX / 2), &[]);
    w.vms
        .get_mut("i-1")
        .expect("vm")
        .info
        .tags
        .insert("test:IdleBehavior".into(), "hold".into());
    w
}

#[test]
fn forget_irrelevant_containers() {
    let mut w = nowhere_to_run();
    w.add(container(1, Queued, 5, 1, GIB));
    w.add(container(2, Complete, 5, 1, GIB));
    w.run(Duration::from_millis(50), |w| {
        w.d.queue().entries().contains_key(uuid(1).as_str())
    });
    assert!(w.d.queue().get(&uuid(1)).is_some());
    assert!(
        w.d.queue().get(&uuid(2)).is_none(),
        "a Complete container never enters the queue"
    );
    w.db.get_mut(&uuid(1)).expect("c1").priority = 0;
    let done = w.run(Duration::from_secs(1), |w| w.d.queue().entries().is_empty());
    assert!(done, "the Queued priority-0 container was forgotten");
    assert_eq!(w.state(&uuid(1)), Queued);
}

/// `containers_longest_wait_time_seconds` follows the oldest wanted container that waits:
/// after passes that change nothing (the gauge then comes from `sync`'s walk) and after one
/// that forgets a container (the gauge's own walk).
#[test]
fn longest_wait_gauge_follows_the_oldest_waiting_container() {
    let mut w = nowhere_to_run();
    let first = w.now;
    w.add(container(1, Queued, 5, 1, GIB));
    w.run(Duration::from_secs(3), |_| false);
    let second = w.now;
    w.add(container(2, Queued, 5, 1, GIB));
    w.run(Duration::from_secs(3), |w| {
        w.d.queue().entries().contains_key(uuid(2).as_str())
    });
    w.run(Duration::from_secs(2), |_| false);
    assert_wait_counts_from(&w, first, "the first");
    w.db.get_mut(&uuid(1)).expect("c1").priority = 0;
    let done = w.run(Duration::from_secs(2), |w| {
        !w.d.queue().entries().contains_key(uuid(1).as_str())
    });
    assert!(done, "the priority-0 container was forgotten");
    w.run(Duration::from_secs(2), |_| false);
    assert_wait_counts_from(&w, second, "now the second");
}

/// The longest-wait gauge counts from `created` (`which` container's creation), to within a
/// second: passes run about every second here, and the containers were created 3 s apart.
fn assert_wait_counts_from(w: &World, created: Timestamp, which: &str) {
    let wait = w.d.sched_metrics().longest_wait_seconds;
    assert!(
        (wait - w.now.since(created).as_secs_f64()).abs() < 1.0,
        "the gauge counts from {which} container's creation: {wait} at {}",
        w.now
    );
}

#[test]
fn cancel_orphaned_containers() {
    let mut w = World::new(go_test_config(), 3);
    let mut c = container(1, Running, 0, 1, GIB);
    c.locked_by_uuid = Some(ME.into());
    w.add(c);
    // An unknown worker that never answers: it might be running the container.
    leftover_vm(&mut w, "i-1", 1, Timestamp(u64::MAX / 2), &[]);
    w.run(Duration::from_millis(100), |_| false);
    assert_eq!(
        w.state(&uuid(1)),
        Running,
        "not cancelled while a worker is unknown"
    );
    assert!(
        w.d.pool()
            .workers()
            .values()
            .any(|x| x.state == WorkerState::Unknown || x.state == WorkerState::Shutdown)
    );
    let done = w.run(Duration::from_secs(2), |w| {
        w.db[&uuid(1)].state == Cancelled && w.d.queue().entries().is_empty()
    });
    assert!(
        done,
        "cancelled and forgotten once the unknown worker is gone"
    );
}

#[test]
fn queue_lock_unlock_cancel_and_guard() {
    use arvados_dispatch_cloud::core::command::{ContainerUpdate, PollResult};
    use arvados_dispatch_cloud::core::queue::Queue;
    use arvados_dispatch_cloud::core::select::TypeTable;
    let cfg = go_test_config();
    let table = TypeTable::new(&cfg.instance_types);
    let mut q = Queue::default();
    let mut c = container(1, Queued, 1, 1, GIB);
    c.mounts = Some(BTreeMap::new());
    q.begin_poll(Timestamp(1));
    q.apply_poll(
        Timestamp(2),
        PollResult {
            containers: vec![c.clone().into()],
            ..PollResult::default()
        },
        &table,
        &cfg.containers,
        100,
    );
    let e = q.get(&uuid(1)).expect("added");
    assert_eq!(e.types.len(), 1, "one eligible type");
    assert!(e.container().mounts.is_none(), "mounts are dropped");
    assert_eq!(
        q.updated(),
        Some(Timestamp(1)),
        "updated is the poll's start time"
    );
    // A lock response during a poll is not overwritten by that poll's older record.
    q.begin_poll(Timestamp(3));
    let locked = ContainerUpdate {
        state: Locked,
        priority: 1,
        locked_by_uuid: Some(ME.into()),
    };
    assert!(q.apply_update(&uuid(1), &locked).0);
    let mut stale = c.clone();
    stale.mounts = None;
    q.apply_poll(
        Timestamp(4),
        PollResult {
            containers: vec![stale.clone().into()],
            ..PollResult::default()
        },
        &table,
        &cfg.containers,
        100,
    );
    assert_eq!(q.get(&uuid(1)).expect("kept").state(), Locked);
    // The next poll brings the record up to date.
    q.begin_poll(Timestamp(5));
    q.apply_poll(
        Timestamp(6),
        PollResult {
            containers: vec![stale.into()],
            ..PollResult::default()
        },
        &table,
        &cfg.containers,
        100,
    );
    assert_eq!(q.get(&uuid(1)).expect("kept").state(), Queued);
    // Cancelled, then forgotten.
    let cancelled = ContainerUpdate {
        state: Cancelled,
        priority: 1,
        locked_by_uuid: None,
    };
    q.apply_update(&uuid(1), &cancelled);
    assert!(q.forget(&uuid(1)));
    assert!(q.entries().is_empty());
}

#[test]
fn server_lock_rules_round_trip() {
    // The fake controller enforces the Rails rules the queue relies on (§4.7).
    let mut w = World::new(go_test_config(), 4);
    w.add(container(1, Queued, 1, 1, GIB));
    let exec = |w: &mut World, kind: CommandKind| {
        let cmd = arvados_dispatch_cloud::core::command::Command {
            op: arvados_dispatch_cloud::core::OpId(1),
            deadline: Timestamp(0),
            kind,
        };
        match w.execute(cmd) {
            Some(arvados_dispatch_cloud::core::Input::ContainerUpdated { result, .. }) => {
                result.map(|u| u.state).map_err(|e| e.message)
            }
            other => panic!("{other:?}"),
        }
    };
    let u = uuid(1);
    assert_eq!(
        exec(&mut w, CommandKind::Unlock { uuid: u.clone() }),
        Err("cannot unlock when Queued".into())
    );
    assert_eq!(
        exec(&mut w, CommandKind::Lock { uuid: u.clone() }),
        Ok(Locked)
    );
    assert!(exec(&mut w, CommandKind::Lock { uuid: u.clone() }).is_err());
    assert_eq!(
        exec(&mut w, CommandKind::Unlock { uuid: u.clone() }),
        Ok(Queued)
    );
    assert!(exec(&mut w, CommandKind::Unlock { uuid: u.clone() }).is_err());
    assert_eq!(
        exec(&mut w, CommandKind::Cancel { uuid: u.clone() }),
        Ok(Cancelled)
    );
    assert!(exec(&mut w, CommandKind::Lock { uuid: u }).is_err());
}

#[test]
fn no_suitable_instance_type_cancels() {
    let mut w = World::new(go_test_config(), 5);
    let mut c = container(1, Queued, 1, 1, GIB);
    c.runtime_constraints.keep_cache_disk = 1 << 50;
    w.add(c);
    w.run(Duration::from_millis(100), |w| {
        w.db[&uuid(1)].state == Cancelled
    });
    assert_eq!(w.state(&uuid(1)), Cancelled);
    assert!(w.d.queue().get(&uuid(1)).is_none(), "never added");
    let cancel = w.commands.iter().find_map(|c| match &c.kind {
        CommandKind::CancelUnsatisfiable {
            uuid: u,
            message,
            lock_first,
        } if u == &uuid(1) => Some((message.clone(), *lock_first)),
        _ => None,
    });
    assert_eq!(
        cancel,
        Some((
            "constraints not satisfiable by any configured instance type".to_string(),
            true
        ))
    );
}

#[test]
fn invalid_mounts_cancel() {
    let mut w = World::new(go_test_config(), 6);
    w.add(container(1, Queued, 1, 1, GIB));
    w.mounts.insert(
        uuid(1),
        "json: cannot unmarshal number into Go value of type arvados.Mount".into(),
    );
    w.run(Duration::from_millis(100), |w| {
        w.db[&uuid(1)].state == Cancelled
    });
    let msg = w.commands.iter().find_map(|c| match &c.kind {
        CommandKind::CancelUnsatisfiable { message, .. } => Some(message.clone()),
        _ => None,
    });
    let msg = msg.expect("cancelled as unsatisfiable");
    assert!(
        msg.starts_with("error getting mounts from container record: json: cannot unmarshal"),
        "{msg}"
    );
}

#[test]
fn management_api_instances_after_one_create() {
    let mut w = World::new(go_test_config(), 7);
    w.boot_delay = Duration::from_secs(3600);
    w.add(container(1, Queued, 1, 1, GIB));
    let done = w.run(Duration::from_secs(1), |w| {
        w.d.instances().iter().any(|v| !v.instance.is_empty())
    });
    assert!(done);
    let views = w.d.instances();
    assert_eq!(views.len(), 1);
    let v = &views[0];
    assert!(v.instance.starts_with("inst"), "{}", v.instance);
    assert_eq!(v.worker_state, WorkerState::Booting);
    assert_eq!(v.price, 0.123);
    assert_eq!(v.arvados_instance_type, "type1");
    assert_eq!(v.provider_instance_type, "providertype1");
    assert_eq!(v.idle_behavior, IdleBehavior::Run);
    assert_eq!(v.last_container_uuid, "");
    assert_eq!(v.running_container_uuids, Some(vec![]));
    // The create carried the reserved tags over ResourceTags.
    let tags = w
        .commands
        .iter()
        .find_map(|c| match &c.kind {
            CommandKind::Create { tags, .. } => Some(tags.clone()),
            _ => None,
        })
        .expect("create");
    assert_eq!(tags["testtag"], "test value");
    assert_eq!(tags["test:InstanceSetID"], SET_ID);
    assert_eq!(tags["test:InstanceType"], "type1");
    assert_eq!(tags["test:IdleBehavior"], "run");
    assert_eq!(tags["test:InstanceSecret"].len(), 40);
}

#[test]
fn management_api_containers_statuses() {
    let mut cfg = go_test_config();
    cfg.cloud_vms.initial_quota_estimate = 4;
    let mut w = World::new(cfg, 8);
    w.quota_max = 4;
    for n in [4, 6, 8, 16] {
        w.capacity_error_providers
            .insert(format!("providertype{n}"));
    }
    w.run_time = Duration::from_secs(5);
    for i in 0..20usize {
        w.add(container(
            i,
            Queued,
            100 - i as i64,
            (i % 8 + 1) as i64,
            (i as i64 % 3 + 1) * GIB,
        ));
    }
    let want = |i: usize| -> (ContainerState, String) {
        match i {
            0..=2 => (Running, String::new()),
            3 => (Locked, "Waiting in queue at position 1.  Cluster is at capacity for all eligible instance types (type4, type6) and cannot start a new instance right now.".into()),
            _ => (Queued, format!("Waiting in queue at position {}.  Cluster is at capacity and cannot start any new instances right now.", i - 2)),
        }
    };
    let ok = w.run(Duration::from_secs(1), |w| {
        let Some(items) = w.d.scheduler_queue() else {
            return false;
        };
        items.len() == 20
            && items.iter().all(|it| {
                let i: usize = it.entry.container().uuid[12..].parse().expect("uuid");
                (it.entry.container().state, it.scheduling_status.clone()) == want(i)
            })
    });
    let got: Vec<(String, ContainerState, String)> =
        w.d.scheduler_queue()
            .unwrap_or_default()
            .into_iter()
            .map(|it| {
                (
                    it.entry.container().uuid.to_string(),
                    it.entry.container().state,
                    it.scheduling_status,
                )
            })
            .collect();
    assert!(ok, "statuses did not converge: {got:#?}");
}

#[test]
fn resume_after_restart() {
    let mut cfg = go_test_config();
    cfg.cloud_vms.timeout_idle = Duration::from_secs(3600);
    cfg.tuning.schedule_min_interval = Duration::from_millis(1);
    let mut w = World::new(cfg.clone(), 9);
    w.run_time = Duration::from_millis(100);
    // Containers that need type1, type1, type2 and type4 (MaxRunningContainersPerInstance 1).
    w.d = Dispatcher::new(
        Config {
            cloud_vms: arvados_dispatch_cloud::core::config::CloudVmsConfig {
                max_running_containers_per_instance: 1,
                ..cfg.cloud_vms.clone()
            },
            ..cfg.clone()
        },
        options(9),
        w.now,
    );
    w.add(container(1, Queued, 4, 1, GIB));
    w.add(container(2, Queued, 3, 1, GIB));
    w.add(container(3, Queued, 2, 2, 2 * GIB));
    w.add(container(4, Queued, 1, 4, 4 * GIB));
    let done = w.run(Duration::from_secs(5), |w| {
        w.db.values().all(|c| c.state == Complete)
            && w.d.instances().len() == 4
            && w.d
                .instances()
                .iter()
                .all(|v| v.worker_state == WorkerState::Idle)
    });
    assert!(done, "four idle instances: {:?}", w.d.instances());
    let t2 =
        w.d.instances()
            .into_iter()
            .find(|v| v.arvados_instance_type == "type2")
            .expect("type2")
            .instance;
    w.d.hold_instance(w.now, &t2).expect("exists");
    w.run(Duration::from_millis(50), |w| {
        w.vms[&t2].info.tags["test:IdleBehavior"] == "hold"
    });
    assert_eq!(
        w.vms[&t2].info.tags["test:IdleBehavior"], "hold",
        "the tag was saved"
    );
    // Restart without type4 in the config.
    let mut cfg2 = cfg.clone();
    cfg2.instance_types.remove("type4");
    w.d = Dispatcher::new(cfg2, options(10), w.now);
    let done = w.run(Duration::from_secs(1), |w| {
        let v = w.d.instances();
        v.len() == 4
            && v.iter()
                .filter(|v| v.arvados_instance_type != "type4")
                .all(|v| v.worker_state == WorkerState::Idle)
    });
    assert!(done, "recovered: {:?}", w.d.instances());
    for v in w.d.instances() {
        let want = match v.arvados_instance_type.as_str() {
            "type2" => IdleBehavior::Hold,
            "type4" => IdleBehavior::Drain,
            _ => IdleBehavior::Run,
        };
        assert_eq!(v.idle_behavior, want, "{}", v.arvados_instance_type);
    }
    assert!(
        w.d.instances().iter().any(|v| v.instance == t2),
        "same instance ID"
    );
}

/// `TestDispatchToStubDriver`: 200 containers, random create/destroy errors, capacity errors on
/// type6, broken and flaky VMs, a 503 halfway, MaxDispatchAttempts 5.
fn dispatch_to_stub_driver(seed: u64) {
    let mut w = World::new(go_test_config(), seed);
    w.max_dispatch_attempts = 5;
    w.quota_max = 10;
    w.create_error_rate = 0.1;
    w.destroy_error_rate = 0.1;
    w.capacity_error_providers.insert("providertype6".into());
    w.run_time = Duration::from_millis(20);
    let mut first_type4: Option<Timestamp> = None;
    w.setup_vm = Some(Box::new(
        move |vm: &mut Vm, n: usize, now: Timestamp, rng: &mut Rng| {
            vm.boot_at = now + Duration::from_millis(rng.below(5));
            if vm.info.provider_type == "providertype4" {
                let first = *first_type4.get_or_insert(now);
                if now < first + Duration::from_millis(300) {
                    vm.broken_at = Some(now);
                    return;
                }
            }
            match n % 7 {
                0 => vm.broken_at = Some(now + Duration::from_millis(rng.below(90))),
                1 => vm.crunch_run_missing = true,
                2 => vm.report_broken_at = Some(now + Duration::from_millis(rng.below(200))),
                _ => {
                    vm.crash_rate = 0.1;
                    vm.deadlock_rate = 0.1;
                }
            }
        },
    ));
    for i in 0..200usize {
        w.add(container(
            i,
            Queued,
            (i % 20 + 1) as i64,
            (i % 8 + 1) as i64,
            (i as i64 % 3 + 1) * GIB,
        ));
    }
    let remaining = |w: &World| w.db.values().filter(|c| !c.state.is_final()).count();
    let replay =
        format!("seed={seed}; replay: cargo test --test core_dispatcher dispatch_to_stub_driver");
    assert!(
        w.run(Duration::from_secs(60), |w| remaining(w) <= 100),
        "{replay}: stuck at {} remaining",
        remaining(&w)
    );
    w.api_503 = 1;
    let done = w.run(Duration::from_secs(120), |w| remaining(w) == 0);
    assert!(
        done,
        "{replay}: {} containers unfinished: {:?}",
        remaining(&w),
        w.db.values()
            .filter(|c| !c.state.is_final())
            .map(|c| (&c.uuid, c.state))
            .collect::<Vec<_>>()
    );
    for (u, n) in &w.payload_starts {
        assert!(*n <= 1, "{replay}: {u} ran {n} times");
    }
    let clean = w.run(Duration::from_secs(30), |w| {
        w.vms.is_empty() && w.d.queue().entries().is_empty()
    });
    assert!(
        clean,
        "{replay}: leftover VMs {:?} or queue entries {}",
        w.vms.keys().collect::<Vec<_>>(),
        w.d.queue().entries().len()
    );
    let m = w.d.pool_metrics();
    let ops = |op: usize, err: usize| m.driver_operations[op][err];
    assert!(ops(0, 0) > 0 && ops(0, 1) > 0, "{replay}: Create ok/err");
    assert!(ops(1, 0) > 0, "{replay}: List");
    assert_eq!(ops(1, 1), 0, "{replay}: List errors");
    assert!(ops(2, 0) > 0, "{replay}: Destroy");
    for o in [
        BootOutcome::Success,
        BootOutcome::Failure,
        BootOutcome::Disappeared,
    ] {
        assert!(
            m.boot_outcomes[o as usize] > 0,
            "{replay}: boot outcome {o:?}"
        );
    }
    assert!(
        m.instances_disappeared[WorkerState::Shutdown as usize] > 0,
        "{replay}"
    );
    assert_eq!(
        m.instances_disappeared[WorkerState::Unknown as usize],
        0,
        "{replay}"
    );
    assert!(m.time_from_queue_ok(), "{replay}");
    let s = w.d.sched_metrics();
    assert!(
        s.last_503_time > 0.0 && s.max_concurrent_containers > 0,
        "{replay}: {s:?}"
    );
}

trait Summaries {
    fn time_from_queue_ok(&self) -> bool;
}

impl Summaries for arvados_dispatch_cloud::core::metrics::PoolMetrics {
    fn time_from_queue_ok(&self) -> bool {
        self.queue_to_crunch_run.count > 0
            && self.shutdown_to_disappearance.count > 0
            && self.run_probe_success.count > 0
            && self.run_probe_fail.count > 0
    }
}

#[test]
fn dispatch_to_stub_driver_seeds() {
    let seeds: Vec<u64> = match std::env::var("DISPATCH_TEST_SEED") {
        Ok(s) => vec![s.parse().expect("DISPATCH_TEST_SEED is a u64")],
        Err(_) => vec![1, 2, 3],
    };
    for seed in seeds {
        dispatch_to_stub_driver(seed);
    }
}

/// Regression (found by tests/core_fuzz.rs): a Running container whose type selection failed is
/// cached with no types; when it is later seen Locked or Queued it is cancelled as
/// unsatisfiable instead of sitting in the queue with nothing to run on.
#[test]
fn regression_untyped_running_container_requeued() {
    let mut w = World::new(go_test_config(), 11);
    let mut c = container(1, Running, 1, 1, GIB);
    c.runtime_constraints.keep_cache_disk = 1 << 50;
    c.locked_by_uuid = Some(ME.into());
    w.add(c);
    // An unknown worker keeps sync from cancelling the Running container at once.
    leftover_vm(&mut w, "i-1", 1, Timestamp(u64::MAX / 2), &[]);
    w.run(Duration::from_millis(20), |w| {
        w.d.queue().get(&uuid(1)).is_some()
    });
    let e =
        w.d.queue()
            .get(&uuid(1))
            .expect("a Running container is cached");
    assert!(e.types.is_empty());
    // The controller requeues it (for example an admin unlock after crunch-run died).
    w.db.get_mut(&uuid(1)).expect("c1").state = Locked;
    let done = w.run(Duration::from_secs(1), |w| {
        w.db[&uuid(1)].state == Cancelled
    });
    assert!(done, "cancelled as unsatisfiable");
    assert!(w.commands.iter().any(
        |c| matches!(&c.kind, CommandKind::CancelUnsatisfiable { uuid: u, .. } if *u == uuid(1))
    ));
}
