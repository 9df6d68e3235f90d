//! Worker-pool acceptance tests: the `TestProbeAndUpdate` table of reference-workers.md §2.9,
//! and the pool tests of §7.6 and reference-scheduler.md §8 (42–44), against the core's pool
//! with a scripted executor and cloud.
#![allow(clippy::field_reassign_with_default)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arvados_dispatch_cloud::core::Timestamp;
use arvados_dispatch_cloud::core::command::{
    CapacityScope, CloudError, CloudErrorKind, CommandKind, ExecError, ExecErrorKind, ExecOutput,
    ExecPurpose, ExecStdin,
};
use arvados_dispatch_cloud::core::config::Config;
use arvados_dispatch_cloud::core::ops::{Ops, Pending};
use arvados_dispatch_cloud::core::pool::remote::RunnerSpec;
use arvados_dispatch_cloud::core::pool::{ExecDone, Pool};
use arvados_dispatch_cloud::core::rng::Rng;
use arvados_dispatch_cloud::core::select::TypeTable;
use arvados_dispatch_cloud::core::types::{
    Container, IdleBehavior, InstanceInfo, InstanceType, WorkerState,
};
use common::*;

const SET: &str = "zzzzz-gj3su-000000000000000";
const T0: Timestamp = Timestamp(10_000_000);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ans {
    Ok,
    Fail,
}

/// Scripted executor answers.
#[derive(Clone, Debug)]
struct Script {
    boot: Ans,
    /// `None`: the run probe fails; `Some(n)`: n containers.
    list: Option<usize>,
    install: Ans,
}

struct Rig {
    pool: Pool,
    ops: Ops,
    rng: Rng,
    cfg: Arc<Config>,
    seen: Vec<(ExecPurpose, String, ExecStdin)>,
}

fn base_config() -> Config {
    let mut cfg = Config::default();
    cfg.instance_types = types(&[1, 2, 3, 4]);
    cfg.cloud_vms.timeout_booting = Duration::from_secs(60);
    cfg.cloud_vms.timeout_probe = Duration::from_secs(1);
    cfg.cloud_vms.max_cloud_ops_per_second = 0.0;
    cfg.cloud_vms.max_concurrent_instance_create_ops = 0;
    cfg
}

impl Rig {
    fn new(cfg: Config, runner: RunnerSpec) -> Rig {
        let table = TypeTable::new(&cfg.instance_types);
        let cfg = Arc::new(cfg);
        Rig {
            pool: Pool::new(cfg.clone(), table, runner, SET, T0),
            ops: Ops::default(),
            rng: Rng::new(1),
            cfg,
            seen: Vec::new(),
        }
    }

    fn type_id(&self, name: &str) -> arvados_dispatch_cloud::core::select::TypeId {
        TypeTable::new(&self.cfg.instance_types)
            .id(name)
            .expect("configured")
    }

    fn info(id: &str, tags: BTreeMap<String, String>, provider: &str) -> InstanceInfo {
        InstanceInfo {
            id: id.into(),
            address: "10.9.8.7".into(),
            provider_type: provider.into(),
            tags,
            remote_user: "root".into(),
            ..InstanceInfo::default()
        }
    }

    /// Issues due cloud calls and returns the Create commands' secrets and tags.
    fn flush(&mut self, now: Timestamp) -> Vec<(String, BTreeMap<String, String>, String)> {
        self.pool.handle_timeout(now, &mut self.ops, &mut self.rng);
        let mut creates = Vec::new();
        while let Some(cmd) = self.ops.pop_command() {
            match cmd.kind {
                CommandKind::Create {
                    tags, init_command, ..
                } => {
                    let (pending, _) = self.ops.take(cmd.op).expect("in flight");
                    let Pending::Create(secret) = pending else {
                        panic!("create")
                    };
                    creates.push((secret, tags, init_command));
                }
                CommandKind::Destroy { instance } => {
                    self.ops.take(cmd.op);
                    self.pool.destroy_finished(&instance, Ok(()));
                }
                CommandKind::SetTags { instance, .. } => {
                    self.ops.take(cmd.op);
                    self.pool.tags_set(&instance, Ok(()));
                }
                _ => {
                    // Probes and lists are driven explicitly by the tests.
                    self.ops.take(cmd.op);
                }
            }
        }
        creates
    }

    /// Creates a booting worker of `type_name` at `now`; returns its ID.
    fn booting(&mut self, now: Timestamp, type_name: &str, id: &str) -> String {
        let t = self.type_id(type_name);
        assert!(self.pool.create(now, &mut self.rng, t));
        let (secret, tags, _) = self.flush(now).pop().expect("create issued");
        let provider = self.cfg.instance_types[type_name].provider_type.clone();
        self.pool
            .create_finished(now, &secret, Ok(Rig::info(id, tags, &provider)));
        id.to_string()
    }

    /// A worker left by a previous process (state unknown).
    fn unknown(&mut self, now: Timestamp, type_name: &str, id: &str) -> String {
        let mut tags = BTreeMap::new();
        tags.insert("ArvadosInstanceSetID".to_string(), SET.to_string());
        tags.insert("ArvadosInstanceType".to_string(), type_name.to_string());
        tags.insert("ArvadosIdleBehavior".to_string(), "run".to_string());
        tags.insert("ArvadosInstanceSecret".to_string(), "abc".to_string());
        let provider = self
            .cfg
            .instance_types
            .get(type_name)
            .map(|t| t.provider_type.clone())
            .unwrap_or_default();
        self.pool
            .listed(now, 0, Ok(vec![Arc::new(Rig::info(id, tags, &provider))]));
        id.to_string()
    }

    /// Runs one probe of `id` at `now` with scripted answers.
    fn probe(&mut self, now: Timestamp, id: &str, s: &Script) {
        self.pool.probe_now(now, &mut self.ops, id);
        let uuids: Vec<String> = (0..s.list.unwrap_or(0)).map(uuid).collect();
        while let Some(cmd) = self.ops.pop_command() {
            let CommandKind::Exec {
                instance,
                purpose,
                command,
                stdin,
            } = cmd.kind
            else {
                self.ops.take(cmd.op);
                continue;
            };
            self.seen
                .push((purpose.clone(), command.clone(), stdin.clone()));
            let fail = |code| {
                Err(ExecError {
                    kind: ExecErrorKind::Exit(code),
                    stdout: String::new(),
                    stderr: "err".into(),
                    message: "exit".into(),
                })
            };
            let result = match &purpose {
                ExecPurpose::BootProbe => {
                    if s.boot == Ans::Ok {
                        Ok(ExecOutput::default())
                    } else {
                        fail(1)
                    }
                }
                ExecPurpose::RunnerMd5 => fail(1),
                ExecPurpose::RunnerInstall => {
                    if s.install == Ans::Ok {
                        Ok(ExecOutput::default())
                    } else {
                        fail(1)
                    }
                }
                ExecPurpose::ListProbe => match s.list {
                    None => fail(1),
                    Some(_) => Ok(ExecOutput {
                        stdout: uuids.iter().map(|u| format!("{u}\n")).collect(),
                        stderr: String::new(),
                    }),
                },
                _ => Ok(ExecOutput::default()),
            };
            let (pending, issued) = self.ops.take(cmd.op).expect("in flight");
            let Pending::Exec(_, p) = pending else {
                panic!("exec")
            };
            self.pool.exec_finished(
                now,
                &mut self.ops,
                ExecDone {
                    op: cmd.op,
                    issued,
                    instance,
                    purpose: p,
                    result,
                },
            );
        }
    }

    fn worker(&self, id: &str) -> (WorkerState, usize) {
        let w = &self.pool.workers()[id];
        (w.state, w.running.len())
    }
}

fn ok_list(n: usize) -> Script {
    Script {
        boot: Ans::Ok,
        list: Some(n),
        install: Ans::Ok,
    }
}

/// Each row: start state, age, boot, run, deploy, other, expected.
#[test]
fn probe_and_update_table() {
    let boot = Duration::from_secs(60);
    let probe = Duration::from_secs(1);
    struct Row {
        name: &'static str,
        start: WorkerState,
        age: Duration,
        script: Script,
        deploy: bool,
        prior_running: usize,
        prior_starting: bool,
        want: WorkerState,
        want_running: Option<usize>,
    }
    let fail_fail = Script {
        boot: Ans::Fail,
        list: None,
        install: Ans::Ok,
    };
    let rows = vec![
        Row {
            name: "unknown/0/fail/fail",
            start: WorkerState::Unknown,
            age: Duration::ZERO,
            script: fail_fail.clone(),
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Unknown,
            want_running: Some(0),
        },
        Row {
            name: "unknown/0/fail/1",
            start: WorkerState::Unknown,
            age: Duration::ZERO,
            script: Script {
                boot: Ans::Fail,
                list: Some(1),
                install: Ans::Ok,
            },
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Unknown,
            want_running: Some(1),
        },
        Row {
            name: "unknown/0/fail/empty/1 previously",
            start: WorkerState::Unknown,
            age: Duration::ZERO,
            script: Script {
                boot: Ans::Fail,
                list: Some(0),
                install: Ans::Ok,
            },
            deploy: false,
            prior_running: 1,
            prior_starting: false,
            want: WorkerState::Unknown,
            want_running: Some(0),
        },
        Row {
            name: "unknown/>boot/fail/fail",
            start: WorkerState::Unknown,
            age: boot + Duration::from_secs(1),
            script: fail_fail.clone(),
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Shutdown,
            want_running: None,
        },
        Row {
            name: "unknown/2boot/ok/fail",
            start: WorkerState::Unknown,
            age: 2 * boot,
            script: Script {
                boot: Ans::Ok,
                list: None,
                install: Ans::Ok,
            },
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Shutdown,
            want_running: None,
        },
        Row {
            name: "unknown/2boot/fail/empty",
            start: WorkerState::Unknown,
            age: 2 * boot,
            script: Script {
                boot: Ans::Fail,
                list: Some(0),
                install: Ans::Ok,
            },
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Shutdown,
            want_running: None,
        },
        Row {
            name: "unknown/2boot/fail/1",
            start: WorkerState::Unknown,
            age: 2 * boot,
            script: Script {
                boot: Ans::Fail,
                list: Some(1),
                install: Ans::Ok,
            },
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Unknown,
            want_running: Some(1),
        },
        Row {
            name: "unknown/0/fail/deployed 1",
            start: WorkerState::Unknown,
            age: Duration::ZERO,
            script: Script {
                boot: Ans::Fail,
                list: Some(1),
                install: Ans::Ok,
            },
            deploy: true,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Unknown,
            want_running: Some(1),
        },
        Row {
            name: "unknown/2boot/fail/deployed 1",
            start: WorkerState::Unknown,
            age: 2 * boot,
            script: Script {
                boot: Ans::Fail,
                list: Some(1),
                install: Ans::Ok,
            },
            deploy: true,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Unknown,
            want_running: Some(1),
        },
        Row {
            name: "unknown/2boot/fail/deployed empty",
            start: WorkerState::Unknown,
            age: 2 * boot,
            script: Script {
                boot: Ans::Fail,
                list: Some(0),
                install: Ans::Ok,
            },
            deploy: true,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Shutdown,
            want_running: None,
        },
        Row {
            name: "booting/0/fail/fail",
            start: WorkerState::Booting,
            age: Duration::ZERO,
            script: fail_fail.clone(),
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Booting,
            want_running: Some(0),
        },
        Row {
            name: "booting/0/fail/ok(not called)",
            start: WorkerState::Booting,
            age: Duration::ZERO,
            script: Script {
                boot: Ans::Fail,
                list: Some(0),
                install: Ans::Ok,
            },
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Booting,
            want_running: Some(0),
        },
        Row {
            name: "booting/0/ok/fail",
            start: WorkerState::Booting,
            age: Duration::ZERO,
            script: Script {
                boot: Ans::Ok,
                list: None,
                install: Ans::Ok,
            },
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Booting,
            want_running: Some(0),
        },
        Row {
            name: "booting/0/ok/ok",
            start: WorkerState::Booting,
            age: Duration::ZERO,
            script: ok_list(0),
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Idle,
            want_running: Some(0),
        },
        Row {
            name: "booting/0/ok/1",
            start: WorkerState::Booting,
            age: Duration::ZERO,
            script: ok_list(1),
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Running,
            want_running: Some(1),
        },
        Row {
            name: "booting/2boot/ok/fail",
            start: WorkerState::Booting,
            age: 2 * boot,
            script: Script {
                boot: Ans::Ok,
                list: None,
                install: Ans::Ok,
            },
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Shutdown,
            want_running: None,
        },
        Row {
            name: "idle/2probe/1",
            start: WorkerState::Idle,
            age: 2 * probe,
            script: ok_list(1),
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Running,
            want_running: Some(1),
        },
        // Go sets up this row as "idle with 1 running", a state our invariants forbid (an idle
        // worker has no runners); the same situation is a running worker with one container.
        Row {
            name: "idle/2probe/fail/1 running",
            start: WorkerState::Running,
            age: 2 * probe,
            script: Script {
                boot: Ans::Ok,
                list: None,
                install: Ans::Ok,
            },
            deploy: false,
            prior_running: 1,
            prior_starting: false,
            want: WorkerState::Shutdown,
            want_running: Some(1),
        },
        Row {
            name: "idle/2probe/fail",
            start: WorkerState::Idle,
            age: 2 * probe,
            script: Script {
                boot: Ans::Ok,
                list: None,
                install: Ans::Ok,
            },
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Shutdown,
            want_running: None,
        },
        Row {
            name: "running/0/1/1 running",
            start: WorkerState::Running,
            age: Duration::ZERO,
            script: ok_list(1),
            deploy: false,
            prior_running: 1,
            prior_starting: false,
            want: WorkerState::Running,
            want_running: Some(1),
        },
        Row {
            name: "running/0/empty/1 running",
            start: WorkerState::Running,
            age: Duration::ZERO,
            script: ok_list(0),
            deploy: false,
            prior_running: 1,
            prior_starting: false,
            want: WorkerState::Idle,
            want_running: Some(0),
        },
        Row {
            name: "running/2probe/empty/1 starting",
            start: WorkerState::Running,
            age: 2 * probe,
            script: ok_list(0),
            deploy: false,
            prior_running: 0,
            prior_starting: true,
            want: WorkerState::Running,
            want_running: Some(0),
        },
        Row {
            name: "booting/0/ok/deployed 1",
            start: WorkerState::Booting,
            age: Duration::ZERO,
            script: ok_list(1),
            deploy: true,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Running,
            want_running: Some(1),
        },
        Row {
            name: "booting/0/ok/deploy fails",
            start: WorkerState::Booting,
            age: Duration::ZERO,
            script: Script {
                boot: Ans::Ok,
                list: Some(0),
                install: Ans::Fail,
            },
            deploy: true,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Booting,
            want_running: Some(0),
        },
        Row {
            name: "booting/0/ok/ok/no binary",
            start: WorkerState::Booting,
            age: Duration::ZERO,
            script: Script {
                boot: Ans::Ok,
                list: Some(0),
                install: Ans::Fail,
            },
            deploy: false,
            prior_running: 0,
            prior_starting: false,
            want: WorkerState::Idle,
            want_running: Some(0),
        },
    ];
    for row in rows {
        let runner = if row.deploy {
            RunnerSpec::deployed(
                "/tmp/arvados-crunch-run",
                "0123456789abcdef0123456789abcdef",
            )
        } else {
            RunnerSpec::installed("crunch-run")
        };
        let mut rig = Rig::new(base_config(), runner);
        let id = match row.start {
            WorkerState::Unknown => rig.unknown(T0, "type1", "i-1"),
            _ => rig.booting(T0, "type1", "i-1"),
        };
        // Bring the worker to its start state at T0 (the probe that does it also sets the ages).
        match row.start {
            WorkerState::Idle | WorkerState::Running => {
                rig.probe(T0, &id, &ok_list(row.prior_running));
            }
            WorkerState::Unknown if row.prior_running > 0 => {
                rig.probe(
                    T0,
                    &id,
                    &Script {
                        boot: Ans::Fail,
                        list: Some(row.prior_running),
                        install: Ans::Ok,
                    },
                );
            }
            _ => {}
        }
        if row.prior_starting {
            let c = Container {
                uuid: uuid(9).into(),
                ..Container::default()
            };
            assert!(
                rig.pool.start_container(T0, &mut rig.ops, &id, &c),
                "{}",
                row.name
            );
            while let Some(cmd) = rig.ops.pop_command() {
                // The --detach call never returns during this test.
                let _ = cmd;
            }
        }
        assert_eq!(
            rig.pool.workers()[id.as_str()].state,
            row.start,
            "{}: setup",
            row.name
        );
        rig.seen.clear();
        rig.probe(T0 + row.age, &id, &row.script);
        let (state, running) = rig.worker(&id);
        assert_eq!(state, row.want, "{}", row.name);
        if let Some(n) = row.want_running {
            assert_eq!(running, n, "{}: running count", row.name);
        }
        if row.name == "booting/0/fail/ok(not called)" {
            assert!(
                !rig.seen.iter().any(|(p, ..)| *p == ExecPurpose::ListProbe),
                "run probe must not be called"
            );
        }
        if row.deploy && row.name.starts_with("unknown/0") {
            let install = rig
                .seen
                .iter()
                .find(|(p, ..)| *p == ExecPurpose::RunnerInstall)
                .expect("copied");
            assert_eq!(install.2, ExecStdin::RunnerBinary, "stdin is the binary");
            let list = rig
                .seen
                .iter()
                .find(|(p, ..)| *p == ExecPurpose::ListProbe)
                .expect("listed");
            assert_eq!(
                list.1,
                "/tmp/arvados-crunch-run/crunch-run~0123456789abcdef0123456789abcdef --list"
            );
        }
        assert!(
            rig.pool.check_invariants(&rig.ops).is_empty(),
            "{}",
            row.name
        );
    }
}

#[test]
fn drain() {
    for (b, ok) in [
        (IdleBehavior::Run, true),
        (IdleBehavior::Hold, false),
        (IdleBehavior::Drain, false),
    ] {
        let mut cfg = base_config();
        cfg.cloud_vms.timeout_idle = Duration::from_secs(3600);
        let mut rig = Rig::new(cfg, RunnerSpec::installed("crunch-run"));
        let id = rig.booting(T0, "type1", "i-1");
        rig.probe(T0, &id, &ok_list(0));
        assert_eq!(rig.worker(&id).0, WorkerState::Idle);
        if b != IdleBehavior::Drain {
            rig.pool.set_idle_behavior(T0, &id, b).expect("exists");
        } else {
            // Drain of an idle worker shuts it down at once, so StartContainer must refuse.
            rig.pool.set_idle_behavior(T0, &id, b).expect("exists");
            assert_eq!(rig.worker(&id).0, WorkerState::Shutdown);
        }
        let c = Container {
            uuid: uuid(1).into(),
            ..Container::default()
        };
        assert_eq!(
            rig.pool.start_container(T0, &mut rig.ops, &id, &c),
            ok,
            "{b:?}"
        );
    }
}

#[test]
fn create_unalloc_shutdown() {
    let mut cfg = base_config();
    cfg.cloud_vms.instance_init_command = "echo 'instance init command goes here'".into();
    cfg.cloud_vms.timeout_idle = Duration::from_secs(3600);
    let mut rig = Rig::new(cfg, RunnerSpec::installed("crunch-run"));
    let order = ["type2", "type1", "type2", "type3"];
    for t in order {
        let tid = rig.type_id(t);
        assert!(rig.pool.create(T0, &mut rig.rng, tid));
    }
    // Pending creates show up at once, before the cloud answers.
    let views = rig.pool.instances();
    assert_eq!(views.len(), 4);
    assert!(
        views
            .iter()
            .all(|v| v.instance.is_empty() && v.worker_state == WorkerState::Booting)
    );
    let creates = rig.flush(T0);
    assert_eq!(creates.len(), 4);
    let init = &creates[0].2;
    let (head, tail) = init.split_once('\n').expect("two lines");
    assert!(
        head.starts_with("umask 0177 && echo -n \"")
            && head.ends_with("\" >/var/run/arvados-instance-secret"),
        "{init}"
    );
    let secret = &head["umask 0177 && echo -n \"".len()
        ..head.len() - "\" >/var/run/arvados-instance-secret".len()];
    assert!(secret.len() == 40 && secret.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(tail, "echo 'instance init command goes here'");
    let mut ids = BTreeMap::new();
    for (i, (secret, tags, _)) in creates.into_iter().enumerate() {
        let t = tags["ArvadosInstanceType"].clone();
        let id = format!("i-{i}");
        let provider = format!("provider{t}");
        rig.pool
            .create_finished(T0, &secret, Ok(Rig::info(&id, tags, &provider)));
        ids.entry(t).or_insert_with(Vec::new).push(id);
    }
    let t3 = ids["type3"][0].clone();
    rig.pool
        .set_idle_behavior(T0, &t3, IdleBehavior::Hold)
        .expect("exists");
    assert!(!rig.pool.shutdown(T0, &t3), "hold refuses Shutdown");
    assert_eq!(
        rig.pool
            .instances()
            .iter()
            .find(|v| v.instance == t3)
            .expect("t3")
            .idle_behavior,
        IdleBehavior::Hold
    );
    let all: Vec<String> = ids.values().flatten().cloned().collect();
    let listing = |rig: &Rig, gone: &[String]| -> Vec<Arc<InstanceInfo>> {
        all.iter()
            .filter(|id| !gone.contains(id))
            .map(|id| {
                let w = &rig.pool.workers()[id.as_str()];
                w.info.clone()
            })
            .collect()
    };
    for id in ids["type2"].clone() {
        assert!(rig.pool.shutdown(T0, &id));
    }
    let mut gone = ids["type2"].clone();
    rig.flush(T0);
    let l = listing(&rig, &gone);
    let th = rig.pool.stamp();
    rig.pool.listed(T0, th, Ok(l));
    assert_eq!(
        rig.pool.workers().len(),
        2,
        "the type2 VMs disappeared after a sync"
    );
    let t1 = ids["type1"][0].clone();
    assert!(rig.pool.shutdown(T0, &t1));
    gone.push(t1);
    let l = listing(&rig, &gone);
    let th = rig.pool.stamp();
    rig.pool.listed(T0, th, Ok(l));
    assert_eq!(rig.pool.workers().len(), 1);
    rig.pool
        .set_idle_behavior(T0, &t3, IdleBehavior::Run)
        .expect("exists");
    rig.pool
        .set_idle_behavior(T0, &t3, IdleBehavior::Drain)
        .expect("exists");
    assert_eq!(rig.worker(&t3).0, WorkerState::Shutdown);
    let th = rig.pool.stamp();
    rig.pool.listed(T0, th, Ok(vec![]));
    assert!(rig.pool.instances().is_empty());
}

#[test]
fn node_create_throttle() {
    let mut cfg = base_config();
    cfg.cloud_vms.max_concurrent_instance_create_ops = 1;
    let mut rig = Rig::new(cfg, RunnerSpec::installed("crunch-run"));
    let t1 = rig.type_id("type1");
    assert!(rig.pool.create(T0, &mut rig.rng, t1));
    assert!(
        !rig.pool.create(T0, &mut rig.rng, t1),
        "limit 1: second create refused"
    );
    // The refusal holds creates for 5 s even after raising the limit.
    let mut cfg2 = base_config();
    cfg2.cloud_vms.max_concurrent_instance_create_ops = 2;
    let mut rig2 = Rig::new(cfg2, RunnerSpec::installed("crunch-run"));
    assert!(rig2.pool.create(T0, &mut rig2.rng, t1));
    assert!(rig2.pool.create(T0, &mut rig2.rng, t1), "limit 2");
    let mut cfg0 = base_config();
    cfg0.cloud_vms.max_concurrent_instance_create_ops = 0;
    let mut rig0 = Rig::new(cfg0, RunnerSpec::installed("crunch-run"));
    for _ in 0..5 {
        assert!(rig0.pool.create(T0, &mut rig0.rng, t1), "0 = unlimited");
    }
    assert!(
        !rig.pool
            .create(T0 + Duration::from_secs(4), &mut rig.rng, t1),
        "holdoff still active"
    );
}

#[test]
fn instance_quota_group() {
    // The stub driver's quota group: first letter of ProviderType, plus "-p" if preemptible.
    let mut cfg = base_config();
    let mut ts = BTreeMap::new();
    for (name, provider, pre) in [
        ("a1", "a1", false),
        ("a2", "a2", false),
        ("a1p", "a1", true),
        ("b3", "b3", false),
        ("b3p", "b3", true),
        ("b4", "b4", false),
        ("b4p", "b4", true),
    ] {
        let t = InstanceType {
            name: name.into(),
            provider_type: provider.into(),
            vcpus: 1,
            ram: GIB,
            price: 1.0,
            preemptible: pre,
            quota_group: format!("{}{}", &provider[..1], if pre { "-p" } else { "" }),
            ..InstanceType::default()
        };
        ts.insert(name.to_string(), t);
    }
    cfg.instance_types = ts;
    let mut rig = Rig::new(cfg, RunnerSpec::installed("crunch-run"));
    let fail = |rig: &mut Rig, name: &str, scope| {
        let tid = rig.type_id(name);
        assert!(rig.pool.create(T0, &mut rig.rng, tid));
        let (secret, ..) = rig.flush(T0).pop().expect("create");
        rig.pool.create_finished(
            T0,
            &secret,
            Err(CloudError {
                kind: CloudErrorKind::Capacity(scope),
                message: "no capacity".into(),
            }),
        );
    };
    fail(&mut rig, "a1", CapacityScope::QuotaGroup);
    let at_cap = |rig: &Rig, name: &str| rig.pool.at_capacity(&rig.cfg.instance_types[name], T0);
    assert!(
        at_cap(&rig, "a1") && at_cap(&rig, "a2"),
        "group a is at capacity"
    );
    assert!(!at_cap(&rig, "a1p"), "group a-p is not");
    fail(&mut rig, "b4p", CapacityScope::InstanceType);
    assert!(at_cap(&rig, "b4p"));
    for t in ["b3", "b3p", "b4", "a1p"] {
        assert!(!at_cap(&rig, t), "{t} is still usable");
        let tid = rig.type_id(t);
        assert!(rig.pool.create(T0, &mut rig.rng, tid), "{t} can be created");
    }
    // The errors expire after a minute.
    assert!(
        !rig.pool
            .at_capacity(&rig.cfg.instance_types["a2"], T0 + Duration::from_secs(61))
    );
}

#[test]
fn quota_error_memory() {
    let mut rig = Rig::new(base_config(), RunnerSpec::installed("crunch-run"));
    let t1 = rig.type_id("type1");
    // With no instances: at quota for one minute.
    assert!(rig.pool.create(T0, &mut rig.rng, t1));
    let (secret, ..) = rig.flush(T0).pop().expect("create");
    rig.pool.create_finished(
        T0,
        &secret,
        Err(CloudError {
            kind: CloudErrorKind::Quota,
            message: "quota".into(),
        }),
    );
    assert!(rig.pool.at_quota(T0));
    assert!(!rig.pool.create(T0, &mut rig.rng, t1));
    assert!(!rig.pool.at_quota(T0 + Duration::from_secs(61)));
    // With instances: at quota until a sync sees fewer than that many.
    let a = rig.booting(T0 + Duration::from_secs(61), "type1", "i-a");
    let b = rig.booting(T0 + Duration::from_secs(61), "type1", "i-b");
    let t = T0 + Duration::from_secs(62);
    assert!(rig.pool.create(t, &mut rig.rng, t1));
    let (secret, ..) = rig.flush(t).pop().expect("create");
    rig.pool.create_finished(
        t,
        &secret,
        Err(CloudError {
            kind: CloudErrorKind::Quota,
            message: "quota".into(),
        }),
    );
    assert!(
        rig.pool.at_quota(t + Duration::from_secs(3600)),
        "until fewer instances"
    );
    let keep = rig.pool.workers()[a.as_str()].info.clone();
    assert!(rig.pool.shutdown(t, &b));
    let th = rig.pool.stamp();
    rig.pool.listed(t, th, Ok(vec![keep]));
    assert!(!rig.pool.at_quota(t), "a sync saw fewer instances");
}

/// Regression (found by tests/core_fuzz.rs): a probe that reports a container already tracked on
/// another instance must not give it a second runner.
#[test]
fn regression_container_reported_on_two_instances() {
    let mut rig = Rig::new(base_config(), RunnerSpec::installed("crunch-run"));
    let a = rig.unknown(T0, "type1", "i-a");
    let b = rig.unknown(T0, "type1", "i-b");
    let one = Script {
        boot: Ans::Ok,
        list: Some(1),
        install: Ans::Ok,
    };
    rig.probe(T0, &a, &one);
    rig.probe(T0, &b, &one);
    assert_eq!(rig.worker(&a).1, 1);
    assert_eq!(rig.worker(&b).1, 0, "the second report is not adopted");
    assert!(rig.pool.check_invariants(&rig.ops).is_empty());
    // Once the first runner is gone, the second instance's process is adopted.
    rig.probe(T0, &a, &ok_list(0));
    rig.probe(T0, &b, &one);
    assert_eq!(rig.worker(&b).1, 1);
    assert!(rig.pool.check_invariants(&rig.ops).is_empty());
}

/// Regression (found by tests/core_fuzz.rs): instances listed from an earlier process may
/// exceed MaxInstances; that is not a violation, and no create starts beyond the limit.
#[test]
fn regression_listing_beyond_max_instances() {
    let mut cfg = base_config();
    cfg.cloud_vms.max_instances = 2;
    let mut rig = Rig::new(cfg, RunnerSpec::installed("crunch-run"));
    let t1 = rig.type_id("type1");
    assert!(rig.pool.create(T0, &mut rig.rng, t1));
    for id in ["old-1", "old-2", "old-3"] {
        rig.unknown(T0, "type1", id);
    }
    assert_eq!(rig.pool.instance_count(), 4);
    assert!(rig.pool.at_quota(T0));
    assert!(!rig.pool.create(T0, &mut rig.rng, t1));
    assert!(rig.pool.check_invariants(&rig.ops).is_empty());
}

/// Runs due cloud calls at `now`, completing each SetTags; returns how many there were.
fn set_tags_calls(rig: &mut Rig, now: Timestamp) -> usize {
    rig.pool.handle_timeout(now, &mut rig.ops, &mut rig.rng);
    let mut n = 0;
    while let Some(cmd) = rig.ops.pop_command() {
        rig.ops.take(cmd.op);
        if let CommandKind::SetTags { instance, .. } = cmd.kind {
            rig.pool.tags_set(&instance, Ok(()));
            n += 1;
        }
    }
    n
}

#[test]
fn tags_are_checked_again_when_the_record_or_the_behaviour_changes() {
    let mut rig = Rig::new(base_config(), RunnerSpec::installed("crunch-run"));
    let id = rig.unknown(T0, "type1", "i-1");
    let at = |s: u64| T0 + Duration::from_secs(s);
    assert_eq!(
        set_tags_calls(&mut rig, at(1)),
        0,
        "listed with current tags"
    );
    // The same shared record again: still current.
    let same = rig.pool.workers()[id.as_str()].info.clone();
    let th = rig.pool.stamp();
    rig.pool.listed(at(2), th, Ok(vec![same.clone()]));
    assert_eq!(set_tags_calls(&mut rig, at(3)), 0);
    // A new record whose idle-behaviour tag someone changed: set back.
    let mut changed = (*same).clone();
    changed
        .tags
        .insert("ArvadosIdleBehavior".to_string(), "hold".to_string());
    let th = rig.pool.stamp();
    rig.pool.listed(at(4), th, Ok(vec![Arc::new(changed)]));
    assert_eq!(
        set_tags_calls(&mut rig, at(5)),
        1,
        "tag changed in the cloud"
    );
    assert_eq!(
        rig.pool.workers()[id.as_str()].info.tags["ArvadosIdleBehavior"],
        "run"
    );
    let th = rig.pool.stamp();
    let fixed = rig.pool.workers()[id.as_str()].info.clone();
    rig.pool.listed(at(6), th, Ok(vec![fixed]));
    assert_eq!(
        set_tags_calls(&mut rig, at(7)),
        0,
        "set back, current again"
    );
    // Same record, new behaviour.
    rig.pool
        .set_idle_behavior(at(8), &id, IdleBehavior::Hold)
        .expect("exists");
    assert_eq!(set_tags_calls(&mut rig, at(9)), 1, "behaviour changed");
}
