//! One worker: the pool's record of one cloud VM and the crunch-run runners on it.
//!
//! Invariants: a runner UUID is in at most one of `running` and `starting`; a worker in
//! `shutdown` never gets a new runner; `version` changes whenever the state or the runner maps
//! change, so a probe that overlapped such a change discards its result (reference-workers.md
//! §2.4, with an explicit generation counter instead of Go's `updated` time).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::super::command::OpId;
use super::super::key::Key;
use super::super::select::TypeId;
use super::super::time::Timestamp;
use super::super::types::{IdleBehavior, InstanceInfo, InstanceType, InstanceView, WorkerState};

/// Which run probe (`crunch-run --list`) a worker gets, as its listed record decides:
/// with the spot price history on stdin when the record has one (§2.3), else the plain
/// command, under `sudo` unless the remote user is root. Kept in the worker's first cache line
/// so that a probe, which visits a cold worker, does not also load the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListProbe {
    /// The plain command; `sudo` for a remote user other than root.
    Plain {
        /// Run under `sudo`.
        sudo: bool,
    },
    /// The command that reads prices on stdin.
    WithPrices,
}

impl ListProbe {
    /// The run probe for an instance listed as `info`.
    pub fn of(info: &InstanceInfo) -> ListProbe {
        if info.price_history.is_empty() {
            ListProbe::Plain {
                sudo: super::remote::needs_sudo(&info.remote_user),
            }
        } else {
            ListProbe::WithPrices
        }
    }
}

/// One crunch-run process the pool believes exists.
#[derive(Clone, Debug, PartialEq)]
pub struct Runner {
    /// Container.
    pub uuid: String,
    /// `created_at` of the container (for the queue-to-crunch-run metric).
    pub created_at: Timestamp,
    /// The `--detach` command in flight.
    pub start_op: Option<OpId>,
    /// A kill loop is running.
    pub stopping: bool,
    /// The kill loop gave up (TimeoutTERM passed).
    pub givenup: bool,
    /// When the kill loop gives up.
    pub kill_deadline: Timestamp,
    /// The `--kill` command in flight.
    pub kill_op: Option<OpId>,
    /// Why it is being killed.
    pub kill_reason: String,
}

impl Runner {
    /// A runner for `uuid`.
    pub fn new(uuid: &str, created_at: Timestamp) -> Runner {
        Runner {
            uuid: uuid.to_string(),
            created_at,
            start_op: None,
            stopping: false,
            givenup: false,
            kill_deadline: Timestamp::ZERO,
            kill_op: None,
            kill_reason: String::new(),
        }
    }
}

/// Which step a probe is at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeStep {
    /// Running BootProbeCommand.
    Boot,
    /// Checking the deployed runner's MD5.
    Md5,
    /// Copying the runner.
    Install,
    /// Running `crunch-run --list`.
    List,
}

/// A probe in progress (single-flight per worker).
#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    /// The command of the current step.
    pub op: OpId,
    /// Step.
    pub step: ProbeStep,
    /// When the probe started.
    pub started: Timestamp,
    /// `version` when it started.
    pub v0: u64,
    /// State when it started.
    pub s0: WorkerState,
    /// Boot probe passed (or was skipped for a ready worker).
    pub booted: bool,
    /// Last error text, for the "boot failed" log.
    pub last_error: String,
}

/// A worker's confirmed runners, by container UUID. An instance runs one container most of
/// the time: the entry with the smallest UUID is kept in place, its UUID in the worker's
/// first cache line, so that the frequent reads (a probe asking whether a reported UUID is
/// known, the invariant checks' walk over every worker's runners) find it without loading a
/// separately allocated map node. The others, when there are any, are in a boxed map.
///
/// Invariant: `rest` is `None` or not empty, and holds only UUIDs greater than `first`'s;
/// `first` is `None` only when the map is empty. Iteration is in UUID order.
#[derive(Clone, Debug, Default)]
pub struct RunnerMap {
    first: Option<(Key, Box<Runner>)>,
    // Boxed, unlike a plain map (24 bytes), so that the first entry fits the worker's first
    // cache line; `None` when empty, so the box costs nothing while one runner is there.
    #[allow(clippy::box_collection)]
    rest: Option<Box<BTreeMap<Key, Runner>>>,
}

impl PartialEq for RunnerMap {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl RunnerMap {
    /// How many runners.
    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.as_ref().map_or(0, |r| r.len())
    }

    /// No runner.
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// Whether `uuid` has a runner here.
    pub fn contains_key(&self, uuid: &str) -> bool {
        self.get(uuid).is_some()
    }

    /// The runner of `uuid`.
    pub fn get(&self, uuid: &str) -> Option<&Runner> {
        let (k, r) = self.first.as_ref()?;
        if k.as_str() == uuid {
            Some(r)
        } else {
            self.rest.as_ref()?.get(uuid)
        }
    }

    /// The runner of `uuid`, to change.
    pub fn get_mut(&mut self, uuid: &str) -> Option<&mut Runner> {
        let (k, r) = self.first.as_mut()?;
        if k.as_str() == uuid {
            Some(r)
        } else {
            self.rest.as_mut()?.get_mut(uuid)
        }
    }

    /// Adds (or replaces) the runner of `uuid`; returns the one it replaced.
    pub fn insert(&mut self, uuid: Key, runner: Runner) -> Option<Runner> {
        let Some((k, r)) = self.first.as_mut() else {
            self.first = Some((uuid, Box::new(runner)));
            return None;
        };
        match uuid.cmp(k) {
            std::cmp::Ordering::Equal => Some(std::mem::replace(r, runner)),
            std::cmp::Ordering::Less => {
                let old = std::mem::replace(k, uuid);
                let old_runner = std::mem::replace(&mut **r, runner);
                self.rest
                    .get_or_insert_with(Box::default)
                    .insert(old, old_runner);
                None
            }
            std::cmp::Ordering::Greater => self
                .rest
                .get_or_insert_with(Box::default)
                .insert(uuid, runner),
        }
    }

    /// Removes the runner of `uuid` and returns it.
    pub fn remove(&mut self, uuid: &str) -> Option<Runner> {
        let (k, _) = self.first.as_ref()?;
        let removed = if k.as_str() == uuid {
            let (_, r) = self.first.take().expect("checked");
            // The smallest of the others, if any, moves into place.
            self.first = self
                .rest
                .as_mut()
                .and_then(|rest| rest.pop_first())
                .map(|(k, next)| (k, Box::new(next)));
            Some(*r)
        } else {
            self.rest.as_mut()?.remove(uuid)
        };
        if self.rest.as_ref().is_some_and(|rest| rest.is_empty()) {
            self.rest = None;
        }
        removed
    }

    /// The runners with their UUIDs, in UUID order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Runner)> {
        self.first
            .iter()
            .map(|(k, r)| (k, &**r))
            .chain(self.rest.iter().flat_map(|r| r.iter()))
    }

    /// The UUIDs, in order.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.iter().map(|(k, _)| k)
    }

    /// The runners, in UUID order.
    pub fn values(&self) -> impl Iterator<Item = &Runner> {
        self.iter().map(|(_, r)| r)
    }
}

/// The pool's record of one VM.
///
/// Laid out in declaration order (`repr(C)`), with what every scheduling pass, gauge and
/// invariant check reads of each worker first: its state, behaviour, type and runner maps
/// share the record's first 64 bytes, and the 64-byte alignment (which the pool's map nodes
/// then have too) makes those one cache line, so the walks over all workers touch one line
/// per worker instead of three.
#[derive(Clone, Debug, PartialEq)]
#[repr(C, align(64))]
pub struct Worker {
    /// State.
    pub state: WorkerState,
    /// Admin intent.
    pub idle_behavior: IdleBehavior,
    /// `ListProbe::of(&self.info)`: set with `info` (see [`Worker::set_info`]).
    pub list_probe: ListProbe,
    /// A number no other worker of the pool has while this one is in it (the runner index
    /// repeats it, and a scheduling pass finds a runner's instance by it); reused once the
    /// worker is gone.
    pub slot: u32,
    /// Configured type, or `None` when the tag names an unconfigured one.
    pub type_id: Option<TypeId>,
    /// Runners the probe has confirmed (or whose start returned).
    pub running: RunnerMap,
    /// Runners whose start is in progress.
    pub starting: BTreeMap<Key, Runner>,
    /// The probe in progress (read by the invariant checks: next to the hot fields).
    pub probe: Option<Probe>,
    /// A boot outcome has been counted.
    pub boot_reported: bool,
    /// Cloud ID.
    pub id: String,
    /// Latest listing.
    pub info: Arc<InstanceInfo>,
    /// The type (for an unconfigured one: only the name is set).
    pub itype: Arc<InstanceType>,
    /// Instance secret from the tag.
    pub secret: String,
    /// First seen by this process.
    pub appeared: Timestamp,
    /// Last successful probe (initially `appeared`).
    pub probed: Timestamp,
    /// Last time it had work.
    pub busy: Timestamp,
    /// Last destroy request.
    pub destroyed: Option<Timestamp>,
    /// Generation of state and runner changes.
    pub version: u64,
    /// Pool stamp of the last listing (or creation).
    pub seen: u64,
    /// First SSH connection (booting workers only).
    pub first_ssh: Option<Timestamp>,
    /// Since when the run probe reports a stale lock.
    pub stale_since: Option<Timestamp>,
    /// UUID last started (or first seen).
    pub last_uuid: String,
    /// A SetTags call is queued or in flight.
    pub tags_busy: bool,
    /// The tags of the SetTags call in flight.
    pub tags_sent: Option<BTreeMap<String, String>>,
    /// The listed record, and the idle behaviour, for which the tags were last found current:
    /// while both stay the same, so do the tags. A listing hands back the same shared record
    /// when nothing changed, so each sync checks a worker's tags without reading them.
    pub tags_current_for: Option<(Arc<InstanceInfo>, IdleBehavior)>,
}

// The hot fields stay within the first 64 bytes: the state, behaviour, probe kind, slot,
// type and the first runner's UUID. `starting` (usually empty) and the probe follow.
const _: () = assert!(
    std::mem::offset_of!(Worker, running) + std::mem::size_of::<RunnerMap>() <= 64
        && std::mem::offset_of!(Worker, slot) < std::mem::offset_of!(Worker, running)
        && std::mem::offset_of!(Worker, list_probe) < std::mem::offset_of!(Worker, running)
        && std::mem::offset_of!(Worker, type_id) < std::mem::offset_of!(Worker, running)
);

impl Worker {
    /// Replaces the listed record, and what the worker keeps of it.
    pub fn set_info(&mut self, info: Arc<InstanceInfo>) {
        self.list_probe = ListProbe::of(&info);
        self.info = info;
    }

    /// Runners in `running` and `starting`.
    pub fn runner_count(&self) -> usize {
        self.running.len() + self.starting.len()
    }

    /// UUIDs both starting and running (none, when consistent), in UUID order: one merge of
    /// the two maps.
    pub fn starting_and_running(&self) -> impl Iterator<Item = &Key> {
        let mut starting = self.starting.keys().peekable();
        // With nothing starting (the usual case), nothing to walk.
        let running = if self.starting.is_empty() {
            None
        } else {
            Some(self.running.keys())
        };
        running.into_iter().flatten().filter(move |uuid| {
            while starting.next_if(|u| u < uuid).is_some() {}
            starting.peek() == Some(uuid)
        })
    }

    /// A shut-down worker with a runner starting (inconsistent).
    pub fn starting_while_shut_down(&self) -> bool {
        self.state == WorkerState::Shutdown && !self.starting.is_empty()
    }

    /// An idle worker with runners (inconsistent).
    pub fn idle_with_runners(&self) -> bool {
        self.state == WorkerState::Idle && self.runner_count() > 0
    }

    /// The runner for `uuid`, wherever it is.
    pub fn runner_mut(&mut self, uuid: &str) -> Option<&mut Runner> {
        if self.running.contains_key(uuid) {
            self.running.get_mut(uuid)
        } else {
            self.starting.get_mut(uuid)
        }
    }

    /// The UUIDs in `running` and `starting`, sorted.
    pub fn runner_uuids(&self) -> Vec<String> {
        let mut uuids: Vec<String> = self
            .running
            .keys()
            .chain(self.starting.keys())
            .map(String::from)
            .collect();
        uuids.sort();
        uuids
    }

    /// The view the management API sees.
    pub fn view(&self) -> InstanceView {
        let uuids = self.runner_uuids();
        InstanceView {
            instance: self.id.clone(),
            address: self.info.address.clone(),
            price: self.itype.price,
            arvados_instance_type: self.itype.name.clone(),
            provider_instance_type: self.info.provider_type.clone(),
            last_container_uuid: self.last_uuid.clone(),
            last_busy: self.busy,
            running_container_uuids: Some(uuids),
            worker_state: self.state,
            idle_behavior: self.idle_behavior,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `RunnerMap` behaves as a `BTreeMap` of the same operations: the same answers, the
    /// same iteration order, whichever entry is first when another arrives or leaves.
    #[test]
    fn runner_map_matches_a_btree_map() {
        let uuid = |i: u64| format!("zzzzz-dz642-{i:015}");
        let mut rng = crate::core::rng::Rng::new(7);
        for round in 0..200 {
            let mut got = RunnerMap::default();
            let mut want: BTreeMap<Key, Runner> = BTreeMap::new();
            for step in 0..40 {
                let u = uuid(rng.below(6));
                let ctx = format!("round {round} step {step} uuid {u}");
                match rng.below(4) {
                    0 | 1 => {
                        let r = Runner::new(&u, Timestamp(step));
                        assert_eq!(
                            got.insert(Key::new(&u), r.clone()),
                            want.insert(Key::new(&u), r),
                            "insert, {ctx}"
                        );
                    }
                    2 => assert_eq!(got.remove(&u), want.remove(u.as_str()), "remove, {ctx}"),
                    _ => {
                        if let (Some(g), Some(w)) = (got.get_mut(&u), want.get_mut(u.as_str())) {
                            g.stopping = true;
                            w.stopping = true;
                        }
                    }
                }
                assert_eq!(got.len(), want.len(), "len, {ctx}");
                assert_eq!(got.is_empty(), want.is_empty(), "is_empty, {ctx}");
                assert_eq!(got.contains_key(&u), want.contains_key(u.as_str()), "{ctx}");
                assert_eq!(got.get(&u), want.get(u.as_str()), "get, {ctx}");
                assert!(got.iter().eq(want.iter()), "iteration, {ctx}");
                assert!(got.keys().eq(want.keys()), "keys, {ctx}");
                assert!(got.values().eq(want.values()), "values, {ctx}");
                assert!(
                    !got.rest.as_ref().is_some_and(|r| r.is_empty()),
                    "an empty rest is dropped, {ctx}"
                );
                let mut rebuilt = RunnerMap::default();
                for (k, r) in want.iter().rev() {
                    rebuilt.insert(k.clone(), r.clone());
                }
                assert_eq!(got, rebuilt, "equality ignores insertion order, {ctx}");
            }
        }
    }
}
