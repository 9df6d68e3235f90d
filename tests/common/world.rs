//! A small deterministic world for dispatcher-level tests: a fake controller (with the Rails
//! lock/unlock rules), a fake cloud and fake VMs running a fake crunch-run, all answering the
//! core's commands in virtual time. It plays the role of Go's stub driver, stub VM and test
//! queue (reference-workers.md §7). The full simulator lives in the `dispatch-sim` crate.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arvados_dispatch_cloud::core::command::{
    ApiError, CapacityScope, CloudError, CloudErrorKind, Command, CommandKind, ContainerUpdate,
    ExecError, ExecErrorKind, ExecOutput, ExecPurpose, Input, PollResult, poll_missing,
};
use arvados_dispatch_cloud::core::config::Config;
use arvados_dispatch_cloud::core::pool::remote::RunnerSpec;
use arvados_dispatch_cloud::core::rng::Rng;
use arvados_dispatch_cloud::core::types::{Container, ContainerState, InstanceInfo};
use arvados_dispatch_cloud::core::{Dispatcher, Options, Timestamp};

pub const ME: &str = "zzzzz-gj3su-000000000000000";
pub const SET_ID: &str = "zzzzz-gj3su-000000000000000";

/// Customises each new VM: (vm, sequence number, now, rng).
pub type SetupVm = Box<dyn FnMut(&mut Vm, usize, Timestamp, &mut Rng)>;

/// A fake crunch-run process.
#[derive(Clone, Debug)]
pub struct Proc {
    pub finish_at: Timestamp,
    /// After exit, listed as stale until this time (None: gone at exit).
    pub stale_until: Option<Timestamp>,
    pub exited: bool,
    pub crash_before_running: bool,
}

/// A fake VM.
#[derive(Clone, Debug)]
pub struct Vm {
    pub info: InstanceInfo,
    pub boot_at: Timestamp,
    pub broken_at: Option<Timestamp>,
    pub report_broken_at: Option<Timestamp>,
    pub crunch_run_missing: bool,
    pub crash_rate: f64,
    pub deadlock_rate: f64,
    pub procs: BTreeMap<String, Proc>,
    pub runner_installed: bool,
}

/// The fake world.
pub struct World {
    pub d: Dispatcher,
    pub now: Timestamp,
    pub rng: Rng,
    pub db: BTreeMap<String, Container>,
    pub lock_count: BTreeMap<String, i64>,
    pub max_dispatch_attempts: i64,
    pub run_time: Duration,
    pub vms: BTreeMap<String, Vm>,
    pub next_vm: usize,
    pub quota_max: usize,
    pub capacity_error_providers: BTreeSet<String>,
    pub create_error_rate: f64,
    pub destroy_error_rate: f64,
    pub boot_delay: Duration,
    pub api_503: usize,
    pub hold_cloud: bool,
    pub held: Vec<Command>,
    pub state_changes: Vec<(String, ContainerState, ContainerState)>,
    pub payload_starts: BTreeMap<String, usize>,
    pub creates: Vec<String>,
    pub commands: Vec<Command>,
    pub setup_vm: Option<SetupVm>,
    pub mounts: BTreeMap<String, String>,
    pub steps: u64,
}

pub fn options(seed: u64) -> Options {
    Options {
        seed,
        instance_set_id: SET_ID.into(),
        runner: RunnerSpec::installed("crunch-run"),
    }
}

impl World {
    pub fn new(cfg: Config, seed: u64) -> World {
        let now = Timestamp(1_000_000);
        World {
            d: Dispatcher::new(cfg, options(seed), now),
            now,
            rng: Rng::derive(seed, "world"),
            db: BTreeMap::new(),
            lock_count: BTreeMap::new(),
            max_dispatch_attempts: 10,
            run_time: Duration::from_millis(50),
            vms: BTreeMap::new(),
            next_vm: 0,
            quota_max: usize::MAX,
            capacity_error_providers: BTreeSet::new(),
            create_error_rate: 0.0,
            destroy_error_rate: 0.0,
            boot_delay: Duration::ZERO,
            api_503: 0,
            hold_cloud: false,
            held: Vec::new(),
            state_changes: Vec::new(),
            payload_starts: BTreeMap::new(),
            creates: Vec::new(),
            commands: Vec::new(),
            setup_vm: None,
            mounts: BTreeMap::new(),
            steps: 0,
        }
    }

    pub fn add(&mut self, mut c: Container) {
        c.created_at = self.now;
        self.db.insert(c.uuid.to_string(), c);
    }

    fn change(&mut self, uuid: &str, to: ContainerState) {
        let c = self.db.get_mut(uuid).expect("container exists");
        let from = c.state;
        c.state = to;
        if to != ContainerState::Locked && to != ContainerState::Running {
            c.locked_by_uuid = None;
        }
        self.state_changes.push((uuid.to_string(), from, to));
    }

    fn update_of(&self, uuid: &str) -> ContainerUpdate {
        let c = &self.db[uuid];
        ContainerUpdate {
            state: c.state,
            priority: c.priority,
            locked_by_uuid: c.locked_by_uuid.clone(),
        }
    }

    fn api_err(&mut self) -> Option<ApiError> {
        if self.api_503 > 0 {
            self.api_503 -= 1;
            return Some(ApiError {
                status: Some(503),
                message: "503 Service Unavailable".into(),
            });
        }
        None
    }

    fn exec_err(kind: ExecErrorKind, stderr: &str) -> Result<ExecOutput, ExecError> {
        let message = format!("{kind:?}: {stderr}");
        Err(ExecError {
            kind,
            stdout: String::new(),
            stderr: stderr.into(),
            message,
        })
    }

    /// Answers one command (`None`: held).
    pub fn execute(&mut self, cmd: Command) -> Option<Input> {
        self.commands.push(cmd.clone());
        let op = cmd.op;
        let now = self.now;
        Some(match cmd.kind {
            CommandKind::PollQueue { tracked } => {
                let known: Vec<String> = tracked.iter().map(|c| c.uuid.to_string()).collect();
                let missing: Vec<String> = poll_missing(&tracked).map(str::to_string).collect();
                if let Some(e) = self.api_err() {
                    return Some(Input::QueuePolled { op, result: Err(e) });
                }
                let known: BTreeSet<String> = known.into_iter().collect();
                let mut res = PollResult::default();
                let mut returned = BTreeSet::new();
                for c in self.db.values() {
                    let mine = c.locked_by_uuid.as_deref() == Some(ME);
                    let avail = c.state == ContainerState::Queued && c.priority > 0;
                    if mine || avail {
                        returned.insert(c.uuid.to_string());
                        res.containers.push(std::sync::Arc::new(c.clone()));
                    }
                }
                for u in missing {
                    if returned.contains(&u) {
                        continue;
                    }
                    match self.db.get(&u) {
                        Some(c) => res.containers.push(std::sync::Arc::new(c.clone())),
                        None => res.deleted.push(u),
                    }
                }
                for c in &mut res.containers {
                    std::sync::Arc::make_mut(c).mounts = None;
                    if !known.contains(&c.uuid.to_string()) {
                        if let Some(err) = self.mounts.get(c.uuid.as_str()) {
                            res.mounts_errors.push((c.uuid.to_string(), err.clone()));
                        } else {
                            std::sync::Arc::make_mut(c).mounts = Some(BTreeMap::new());
                        }
                    }
                }
                Input::QueuePolled {
                    op,
                    result: Ok(res),
                }
            }
            CommandKind::Lock { uuid } => {
                let result = match self.api_err() {
                    Some(e) => Err(e),
                    None => {
                        let c = &self.db[&uuid];
                        if c.state != ContainerState::Queued {
                            Err(ApiError {
                                status: Some(422),
                                message: format!("cannot lock when {}", c.state),
                            })
                        } else if c.priority <= 0 {
                            Err(ApiError {
                                status: Some(422),
                                message: "cannot lock when priority<=0".into(),
                            })
                        } else {
                            self.change(&uuid, ContainerState::Locked);
                            self.db.get_mut(&uuid).expect("exists").locked_by_uuid =
                                Some(ME.into());
                            *self.lock_count.entry(uuid.clone()).or_default() += 1;
                            Ok(self.update_of(&uuid))
                        }
                    }
                };
                Input::ContainerUpdated { op, result }
            }
            CommandKind::Unlock { uuid } => {
                let result = match self.api_err() {
                    Some(e) => Err(e),
                    None => {
                        let c = &self.db[&uuid];
                        if c.state != ContainerState::Locked {
                            Err(ApiError {
                                status: Some(422),
                                message: format!("cannot unlock when {}", c.state),
                            })
                        } else {
                            let n = self.lock_count.get(&uuid).copied().unwrap_or(0);
                            if n >= self.max_dispatch_attempts {
                                self.change(&uuid, ContainerState::Cancelled);
                            } else {
                                self.change(&uuid, ContainerState::Queued);
                            }
                            Ok(self.update_of(&uuid))
                        }
                    }
                };
                Input::ContainerUpdated { op, result }
            }
            CommandKind::Cancel { uuid } => {
                let result = match self.api_err() {
                    Some(e) => Err(e),
                    None => {
                        if !self.db[&uuid].state.is_final() {
                            self.change(&uuid, ContainerState::Cancelled);
                        }
                        Ok(self.update_of(&uuid))
                    }
                };
                Input::ContainerUpdated { op, result }
            }
            CommandKind::CancelUnsatisfiable { uuid, .. } => {
                if !self.db[&uuid].state.is_final() {
                    self.change(&uuid, ContainerState::Cancelled);
                }
                Input::UnsatisfiableCancelled { op, result: Ok(()) }
            }
            CommandKind::Create {
                instance_type,
                tags,
                ..
            } => {
                if self.hold_cloud {
                    self.held.push(Command {
                        op,
                        deadline: cmd.deadline,
                        kind: CommandKind::Create {
                            instance_type,
                            image_id: String::new(),
                            tags,
                            init_command: String::new(),
                            install_public_key: true,
                        },
                    });
                    return None;
                }
                self.creates.push(instance_type.name.clone());
                let live = self.vms.len();
                let err = |kind, message: &str| CloudError {
                    kind,
                    message: message.into(),
                };
                let result = if self.rng.unit_f64() < self.create_error_rate {
                    Err(err(CloudErrorKind::Transient, "random create error"))
                } else if live >= self.quota_max {
                    Err(err(CloudErrorKind::Quota, "quota"))
                } else if self
                    .capacity_error_providers
                    .contains(&instance_type.provider_type)
                {
                    Err(err(
                        CloudErrorKind::Capacity(CapacityScope::InstanceType),
                        "no capacity",
                    ))
                } else {
                    self.next_vm += 1;
                    let id = format!("inst{},{}", self.next_vm, instance_type.provider_type);
                    let info = InstanceInfo {
                        id: id.clone(),
                        address: String::new(),
                        provider_type: instance_type.provider_type.clone(),
                        tags,
                        remote_user: "root".into(),
                        ..InstanceInfo::default()
                    };
                    let mut vm = Vm {
                        info: info.clone(),
                        boot_at: now + self.boot_delay,
                        broken_at: None,
                        report_broken_at: None,
                        crunch_run_missing: false,
                        crash_rate: 0.0,
                        deadlock_rate: 0.0,
                        procs: BTreeMap::new(),
                        runner_installed: false,
                    };
                    if let Some(f) = self.setup_vm.as_mut() {
                        f(&mut vm, self.next_vm, now, &mut self.rng);
                    }
                    self.vms.insert(id, vm);
                    Ok(info)
                };
                Input::CreateFinished { op, result }
            }
            CommandKind::Destroy { instance } => {
                let result = if self.rng.unit_f64() < self.destroy_error_rate {
                    Err(CloudError {
                        kind: CloudErrorKind::Transient,
                        message: "instance could not be destroyed".into(),
                    })
                } else {
                    self.vms.remove(&instance);
                    Ok(())
                };
                Input::DestroyFinished { op, result }
            }
            CommandKind::ListInstances { .. } => Input::InstancesListed {
                op,
                result: Ok(self
                    .vms
                    .values()
                    .map(|v| Arc::new(v.info.clone()))
                    .collect()),
            },
            CommandKind::SetTags { instance, tags } => {
                let result = match self.vms.get_mut(&instance) {
                    Some(vm) => {
                        vm.info.tags = tags;
                        Ok(())
                    }
                    None => Err(CloudError {
                        kind: CloudErrorKind::NotFound,
                        message: "no such instance".into(),
                    }),
                };
                Input::TagsSet { op, result }
            }
            CommandKind::Exec {
                instance, purpose, ..
            } => {
                let result = self.exec(&instance, purpose);
                Input::ExecFinished { op, result }
            }
        })
    }

    fn exec(&mut self, id: &str, purpose: ExecPurpose) -> Result<ExecOutput, ExecError> {
        let now = self.now;
        let Some(vm) = self.vms.get(id) else {
            return Self::exec_err(ExecErrorKind::Connect, "connection refused");
        };
        if now < vm.boot_at {
            return Self::exec_err(ExecErrorKind::Exit(1), "stub is booting");
        }
        if vm.broken_at.is_some_and(|t| now >= t) {
            return Self::exec_err(ExecErrorKind::Exit(2), "cannot fork");
        }
        let crunch = matches!(
            purpose,
            ExecPurpose::ListProbe
                | ExecPurpose::StartRunner { .. }
                | ExecPurpose::KillRunner { .. }
        );
        if crunch && vm.crunch_run_missing {
            return Self::exec_err(ExecErrorKind::Exit(1), "crunch-run: command not found");
        }
        match purpose {
            ExecPurpose::BootProbe | ExecPurpose::RunnerInstall => Ok(ExecOutput::default()),
            ExecPurpose::RunnerMd5 => Self::exec_err(ExecErrorKind::Exit(1), "no such file"),
            ExecPurpose::ListProbe => {
                let mut out = String::new();
                for (u, p) in &vm.procs {
                    if p.exited {
                        out.push_str(&format!("{u} stale\n"));
                    } else {
                        out.push_str(&format!("{u}\n"));
                    }
                }
                if vm.report_broken_at.is_some_and(|t| now >= t) {
                    out.push_str("broken\n");
                }
                Ok(ExecOutput {
                    stdout: out,
                    stderr: String::new(),
                })
            }
            ExecPurpose::StartRunner { uuid } => {
                let crash = self.rng.unit_f64() < vm.crash_rate;
                let early = crash && self.rng.unit_f64() < 0.5;
                let vm = self.vms.get_mut(id).expect("exists");
                if vm.procs.contains_key(&uuid) {
                    return Self::exec_err(ExecErrorKind::Exit(1), "already running");
                }
                vm.procs.insert(
                    uuid.clone(),
                    Proc {
                        finish_at: now
                            + if crash {
                                Duration::from_millis(1)
                            } else {
                                self.run_time
                            },
                        stale_until: None,
                        exited: false,
                        crash_before_running: early,
                    },
                );
                if !early
                    && self
                        .db
                        .get(&uuid)
                        .is_some_and(|c| c.state == ContainerState::Locked)
                {
                    self.change(&uuid, ContainerState::Running);
                    *self.payload_starts.entry(uuid).or_default() += 1;
                }
                Ok(ExecOutput::default())
            }
            ExecPurpose::KillRunner { uuid } => {
                let vm = self.vms.get_mut(id).expect("exists");
                if vm.procs.get(&uuid).is_some_and(|p| !p.exited) {
                    vm.procs.remove(&uuid);
                    if self
                        .db
                        .get(&uuid)
                        .is_some_and(|c| c.state == ContainerState::Running)
                    {
                        self.change(&uuid, ContainerState::Cancelled);
                    }
                }
                Ok(ExecOutput::default())
            }
        }
    }

    /// Finishes fake crunch-run processes that are due.
    fn tick_procs(&mut self) {
        let now = self.now;
        let mut done = Vec::new();
        for (id, vm) in &mut self.vms {
            vm.procs.retain(|u, p| {
                if p.exited {
                    return p.stale_until.is_some_and(|t| now < t);
                }
                if now >= p.finish_at {
                    done.push((id.clone(), u.clone(), p.crash_before_running));
                    return false;
                }
                true
            });
        }
        for (id, uuid, early) in done {
            if !early
                && self
                    .db
                    .get(&uuid)
                    .is_some_and(|c| c.state == ContainerState::Running)
            {
                self.change(&uuid, ContainerState::Complete);
            }
            let deadlock = self.vms.get(&id).map(|v| v.deadlock_rate).unwrap_or(0.0);
            if deadlock > 0.0
                && self.rng.unit_f64() < deadlock
                && let Some(vm) = self.vms.get_mut(&id)
            {
                vm.procs.insert(
                    uuid,
                    Proc {
                        finish_at: now,
                        stale_until: Some(Timestamp(u64::MAX)),
                        exited: true,
                        crash_before_running: false,
                    },
                );
            }
        }
    }

    fn next_proc_event(&self) -> Option<Timestamp> {
        self.vms
            .values()
            .flat_map(|v| v.procs.values())
            .filter(|p| !p.exited)
            .map(|p| p.finish_at)
            .min()
    }

    /// Answers commands until the core has nothing more to say at `now`.
    pub fn settle(&mut self) {
        loop {
            let mut cmds = Vec::new();
            while let Some(c) = self.d.poll_command() {
                cmds.push(c);
            }
            if cmds.is_empty() {
                break;
            }
            for c in cmds {
                if let Some(input) = self.execute(c) {
                    self.d.handle_input(self.now, input);
                }
            }
            let v = self.d.check_invariants();
            assert!(v.is_empty(), "invariants violated at {}: {v:?}", self.now);
        }
    }

    /// Delivers a held command's normal answer now.
    pub fn release_held(&mut self) {
        self.hold_cloud = false;
        for c in std::mem::take(&mut self.held) {
            if let Some(input) = self.execute(c) {
                self.d.handle_input(self.now, input);
            }
        }
        self.settle();
    }

    /// Runs until `until` (virtual time) or until `stop` holds. Returns whether `stop` held.
    pub fn run(&mut self, until: Duration, mut stop: impl FnMut(&World) -> bool) -> bool {
        let end = self.now + until;
        loop {
            self.settle();
            if stop(self) {
                return true;
            }
            let t = [self.d.poll_timeout(), self.next_proc_event()]
                .into_iter()
                .flatten()
                .min();
            let Some(t) = t else { return false };
            if t > end {
                self.now = end;
                return false;
            }
            self.steps += 1;
            assert!(
                self.steps < 5_000_000,
                "too many steps; stuck at {}",
                self.now
            );
            self.now = self.now.max(t);
            self.tick_procs();
            self.d.handle_timeout(self.now);
        }
    }

    /// Advances virtual time by `d`.
    pub fn advance(&mut self, d: Duration) {
        self.run(d, |_| false);
    }

    pub fn state(&self, uuid: &str) -> ContainerState {
        self.db[uuid].state
    }
}
