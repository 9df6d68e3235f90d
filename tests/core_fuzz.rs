//! Property test: random sequences of inputs, completions (successes, errors, duplicates,
//! unknown ids, wrong kinds), admin calls and timeouts never panic the core and never break
//! `check_invariants()`.
#![allow(clippy::field_reassign_with_default)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use arvados_dispatch_cloud::core::command::{
    ApiError, CapacityScope, CloudError, CloudErrorKind, Command, CommandKind, ContainerUpdate,
    ExecError, ExecErrorKind, ExecOutput, ExecPurpose, Input, PollResult,
};
use arvados_dispatch_cloud::core::config::Config;
use arvados_dispatch_cloud::core::types::{Container, ContainerState, InstanceInfo};
use arvados_dispatch_cloud::core::{Dispatcher, OpId, Timestamp};
use common::world::{ME, SET_ID, options};
use common::*;

#[derive(Clone, Debug)]
enum Step {
    /// Let time pass and handle timeouts.
    Advance(u64),
    /// Answer the pending command at this index, with this outcome selector.
    Answer(usize, u8, u8),
    /// Deliver a completion for an op id that was never issued or already completed.
    Bogus(u64, u8),
    /// An admin call on instance/container number n.
    Admin(u8, usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (1u64..20_000).prop_map(Step::Advance),
        4 => (0usize..64, any::<u8>(), any::<u8>()).prop_map(|(i, a, b)| Step::Answer(i, a, b)),
        1 => (0u64..200, any::<u8>()).prop_map(|(o, k)| Step::Bogus(o, k)),
        1 => (0u8..5, 0usize..8).prop_map(|(k, n)| Step::Admin(k, n)),
    ]
}

const STATES: [ContainerState; 5] = [
    ContainerState::Queued,
    ContainerState::Locked,
    ContainerState::Running,
    ContainerState::Complete,
    ContainerState::Cancelled,
];

fn fuzz_config() -> Config {
    let mut cfg = Config::default();
    cfg.instance_types = types(&[1, 2, 4, 8]);
    cfg.cloud_vms.max_instances = 4;
    cfg.cloud_vms.max_concurrent_instance_create_ops = 2;
    cfg.cloud_vms.poll_interval = Duration::from_secs(1);
    cfg.cloud_vms.sync_interval = Duration::from_secs(3);
    cfg.cloud_vms.probe_interval = Duration::from_secs(1);
    cfg.cloud_vms.timeout_idle = Duration::from_secs(5);
    cfg.cloud_vms.timeout_booting = Duration::from_secs(8);
    cfg.cloud_vms.timeout_probe = Duration::from_secs(8);
    cfg.cloud_vms.timeout_term = Duration::from_secs(4);
    cfg.containers.stale_lock_timeout = Duration::from_secs(2);
    cfg.tuning.api_call_timeout = Duration::from_secs(10);
    cfg.tuning.cloud_call_timeout = Duration::from_secs(10);
    cfg.tuning.exec_timeout = Duration::from_secs(10);
    cfg
}

fn container(n: u8, sel: u8) -> Container {
    let mut c = Container {
        uuid: uuid(n as usize % 8).into(),
        state: STATES[(sel % 5) as usize],
        priority: i64::from(sel % 4),
        ..Container::default()
    };
    c.runtime_constraints.vcpus = i64::from(sel % 3);
    c.runtime_constraints.ram = i64::from(sel % 7) * GIB / 2;
    c.scheduling_parameters.supervisor = sel.is_multiple_of(11);
    if sel.is_multiple_of(13) {
        c.runtime_constraints.ram = 1 << 45; // unsatisfiable
    }
    if c.state != ContainerState::Queued {
        c.locked_by_uuid = Some(ME.into());
    }
    c
}

struct Fuzz {
    d: Dispatcher,
    now: Timestamp,
    pending: Vec<Command>,
    answered: Vec<OpId>,
    instances: BTreeMap<String, InstanceInfo>,
    next_vm: usize,
}

impl Fuzz {
    fn drain(&mut self) {
        while let Some(c) = self.d.poll_command() {
            self.pending.push(c);
        }
        let v = self.d.check_invariants();
        assert!(v.is_empty(), "invariants violated at {}: {v:?}", self.now);
    }

    fn api_err(b: u8) -> ApiError {
        ApiError {
            status: Some(if b.is_multiple_of(2) { 503 } else { 422 }),
            message: "fuzz".into(),
        }
    }

    fn cloud_err(&self, b: u8) -> CloudError {
        let kind = match b % 6 {
            0 => CloudErrorKind::Quota,
            1 => CloudErrorKind::Capacity(CapacityScope::InstanceType),
            2 => CloudErrorKind::Capacity(CapacityScope::QuotaGroup),
            3 => CloudErrorKind::RateLimited {
                retry_at: self.now + Duration::from_secs(u64::from(b % 4)),
            },
            4 => CloudErrorKind::Capacity(CapacityScope::Global),
            _ => CloudErrorKind::Transient,
        };
        CloudError {
            kind,
            message: "fuzz".into(),
        }
    }

    fn answer(&mut self, cmd: Command, a: u8, b: u8) -> Input {
        let op = cmd.op;
        let fail = a.is_multiple_of(4);
        match cmd.kind {
            CommandKind::PollQueue { tracked } => {
                let known: Vec<String> = tracked.iter().map(|c| c.uuid.to_string()).collect();
                if fail {
                    return Input::QueuePolled {
                        op,
                        result: Err(Self::api_err(b)),
                    };
                }
                let mut res = PollResult::default();
                for i in 0..(b % 6) {
                    let mut c = container(a.wrapping_add(i), b.wrapping_mul(i + 1));
                    if !known.contains(&c.uuid.to_string()) {
                        if i == 3 {
                            res.mounts_errors
                                .push((c.uuid.to_string(), "json: cannot unmarshal fuzz".into()));
                        } else {
                            c.mounts = Some(BTreeMap::new());
                        }
                    }
                    res.containers.push(std::sync::Arc::new(c));
                }
                if b.is_multiple_of(9) {
                    res.deleted.push(uuid(usize::from(a % 8)));
                }
                Input::QueuePolled {
                    op,
                    result: Ok(res),
                }
            }
            CommandKind::Lock { .. } | CommandKind::Unlock { .. } | CommandKind::Cancel { .. } => {
                let result = if fail {
                    Err(Self::api_err(b))
                } else {
                    Ok(ContainerUpdate {
                        state: STATES[usize::from(b % 5)],
                        priority: i64::from(b % 3),
                        locked_by_uuid: None,
                    })
                };
                Input::ContainerUpdated { op, result }
            }
            CommandKind::CancelUnsatisfiable { .. } => Input::UnsatisfiableCancelled {
                op,
                result: if fail { Err(Self::api_err(b)) } else { Ok(()) },
            },
            CommandKind::Create {
                instance_type,
                tags,
                ..
            } => {
                if fail {
                    return Input::CreateFinished {
                        op,
                        result: Err(self.cloud_err(b)),
                    };
                }
                self.next_vm += 1;
                let info = InstanceInfo {
                    id: format!("i-{}", self.next_vm),
                    address: "10.0.0.1".into(),
                    provider_type: instance_type.provider_type.clone(),
                    tags,
                    remote_user: if b.is_multiple_of(2) {
                        "root".into()
                    } else {
                        "admin".into()
                    },
                    ..InstanceInfo::default()
                };
                self.instances.insert(info.id.clone(), info.clone());
                Input::CreateFinished {
                    op,
                    result: Ok(info),
                }
            }
            CommandKind::Destroy { instance } => {
                if !fail {
                    self.instances.remove(&instance);
                }
                Input::DestroyFinished {
                    op,
                    result: if fail { Err(self.cloud_err(b)) } else { Ok(()) },
                }
            }
            CommandKind::ListInstances { .. } => {
                if fail {
                    return Input::InstancesListed {
                        op,
                        result: Err(self.cloud_err(b)),
                    };
                }
                let mut list: Vec<InstanceInfo> = self.instances.values().cloned().collect();
                if b.is_multiple_of(5) {
                    // An instance of ours created by an earlier process, with an unknown type.
                    let tags = BTreeMap::from([
                        ("ArvadosInstanceSetID".to_string(), SET_ID.to_string()),
                        ("ArvadosInstanceType".to_string(), format!("type{}", b % 10)),
                        (
                            "ArvadosIdleBehavior".to_string(),
                            ["run", "hold", "drain", "bogus"][usize::from(a % 4)].to_string(),
                        ),
                    ]);
                    let info = InstanceInfo {
                        id: format!("old-{}", a % 3),
                        address: String::new(),
                        provider_type: "p".into(),
                        tags,
                        remote_user: "root".into(),
                        ..InstanceInfo::default()
                    };
                    self.instances.insert(info.id.clone(), info.clone());
                    list.push(info);
                }
                if b.is_multiple_of(7) && !list.is_empty() {
                    list.remove(usize::from(a) % list.len());
                }
                Input::InstancesListed {
                    op,
                    result: Ok(list.into_iter().map(Arc::new).collect()),
                }
            }
            CommandKind::SetTags { .. } => Input::TagsSet {
                op,
                result: if fail { Err(self.cloud_err(b)) } else { Ok(()) },
            },
            CommandKind::Exec { purpose, .. } => {
                if fail {
                    let kind = [
                        ExecErrorKind::Exit(1),
                        ExecErrorKind::Timeout,
                        ExecErrorKind::Connect,
                        ExecErrorKind::HostKey,
                    ][usize::from(b % 4)]
                    .clone();
                    return Input::ExecFinished {
                        op,
                        result: Err(ExecError {
                            kind,
                            stdout: String::new(),
                            stderr: "x".into(),
                            message: "fuzz".into(),
                        }),
                    };
                }
                let stdout = match purpose {
                    ExecPurpose::ListProbe => {
                        let mut s = String::new();
                        for i in 0..(b % 4) {
                            s.push_str(&uuid(usize::from(a.wrapping_add(i) % 8)));
                            if (a ^ i).is_multiple_of(5) {
                                s.push_str(" stale");
                            }
                            s.push('\n');
                        }
                        if b.is_multiple_of(17) {
                            s.push_str("broken\n");
                        }
                        s
                    }
                    _ => String::new(),
                };
                Input::ExecFinished {
                    op,
                    result: Ok(ExecOutput {
                        stdout,
                        stderr: String::new(),
                    }),
                }
            }
        }
    }

    fn run(&mut self, s: Step) {
        match s {
            Step::Advance(ms) => {
                self.now = self.now + Duration::from_millis(ms);
                self.d.handle_timeout(self.now);
            }
            Step::Answer(i, a, b) => {
                if self.pending.is_empty() {
                    self.d.handle_timeout(self.now);
                } else {
                    let cmd = self.pending.remove(i % self.pending.len());
                    let op = cmd.op;
                    let input = self.answer(cmd, a, b);
                    self.d.handle_input(self.now, input.clone());
                    self.answered.push(op);
                    if a % 16 == 1 {
                        // A duplicate completion must be ignored.
                        let before = self.d.ignored_completions();
                        self.d.handle_input(self.now, input);
                        assert_eq!(self.d.ignored_completions(), before + 1);
                    }
                }
            }
            Step::Bogus(o, k) => {
                let op = if k.is_multiple_of(2) {
                    OpId(1_000_000 + o)
                } else {
                    self.answered
                        .get(o as usize)
                        .copied()
                        .unwrap_or(OpId(999_999))
                };
                let input = match k % 3 {
                    0 => Input::TagsSet { op, result: Ok(()) },
                    1 => Input::QueuePolled {
                        op,
                        result: Ok(PollResult::default()),
                    },
                    _ => Input::SshConnected {
                        instance: format!("i-{o}"),
                    },
                };
                self.d.handle_input(self.now, input);
            }
            Step::Admin(k, n) => {
                let id = format!("i-{n}");
                let now = self.now;
                let _ = match k {
                    0 => self.d.hold_instance(now, &id),
                    1 => self.d.drain_instance(now, &id),
                    2 => self.d.run_instance(now, &id),
                    3 => self.d.kill_instance(now, &id, "fuzz"),
                    _ => self.d.kill_container(now, &uuid(n), "fuzz"),
                };
            }
        }
        self.drain();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 2000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_inputs_never_break_invariants(seed in any::<u64>(), steps in proptest::collection::vec(step(), 1..300)) {
        let now = Timestamp(1_000_000);
        let mut f = Fuzz {
            d: Dispatcher::new(fuzz_config(), options(seed), now),
            now,
            pending: Vec::new(),
            answered: Vec::new(),
            instances: BTreeMap::new(),
            next_vm: 0,
        };
        f.d.handle_timeout(now);
        f.drain();
        for s in steps {
            f.run(s);
        }
        // Everything left pending eventually times out without breaking anything.
        for _ in 0..5 {
            f.now = f.now + Duration::from_secs(30);
            f.d.handle_timeout(f.now);
            f.drain();
        }
    }
}
