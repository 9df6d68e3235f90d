//! The production shell (`arvados_dispatch_cloud::runtime::Shell`) driven by the simulator's
//! models under tokio's paused clock (feature `shell`).
//!
//! The shell runs unchanged: its loop, its one-task-per-command execution, its deadlines and
//! its instance bookkeeping. Only its adapters are simulated: the controller, the cloud and the
//! remote commands are routed to a [`World`] built in external mode, exactly as the world's own
//! loop routes the core's commands, and each completion is delivered after
//! `tokio::time::sleep_until` its simulated due time. The clock is a
//! [`TokioClock`](arvados_dispatch_cloud::runtime::TokioClock), so on a current-thread runtime
//! started paused, virtual time advances only when every task waits and a simulated hour takes
//! milliseconds.
//!
//! Invariants:
//! - Every random draw comes from the world's seeded streams (`core::rng`) or the core's own
//!   seeded stream; the shell and its adapters never draw. With tokio's deterministic
//!   current-thread scheduler and the shell's fixed `select!` order, a run is a function of the
//!   scenario and the seed: the transcript (the world's event log, which also records every
//!   command, input and timer firing of the shell's core) hashes the same on every run.
//! - The world lives in one task (the world task); it is never shared. Adapters send it
//!   requests over a channel and wait for the answer, so the models see requests in the order
//!   the shell made them, at the virtual time it made them.
//! - Nothing here opens a socket, reads the wall clock or spawns a thread.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arvados_dispatch_cloud::cloud::{
    BoxFuture, CloudError, ConnectHook, CreateRequest, InstanceSet, cloud_error,
};
use arvados_dispatch_cloud::core::command::{
    ApiError, CloudErrorKind, Command, CommandKind, ExecError, ExecErrorKind, ExecOutput,
    ExecPurpose, ExecStdin, Input, OpId,
};
use arvados_dispatch_cloud::core::time::millis;
use arvados_dispatch_cloud::core::types::InstanceInfo;
use arvados_dispatch_cloud::core::{Dispatcher, Timestamp};
use arvados_dispatch_cloud::runtime::config_data::Renderer;
use arvados_dispatch_cloud::runtime::{
    Adapters, Clock, ControllerApi, Executors, Observer, PublicKey, Shell, TokioClock,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::check::Checker;
use crate::scenario::Scenario;
use crate::world::{World, dispatcher_options};

/// The op and deadline of the commands the adapters build for the world's router, which uses
/// neither: the shell keeps the real ones.
const PLACEHOLDER_OP: OpId = OpId(0);

/// What a shell run under the simulator found.
#[derive(Clone, Debug)]
pub struct ShellRun {
    /// The scenario's name.
    pub scenario: String,
    /// The root seed.
    pub seed: u64,
    /// Virtual time at the end, ms.
    pub end_ms: u64,
    /// FNV-1a 64 of the transcript (16 hex digits).
    pub transcript_hash: String,
    /// Transcript lines.
    pub transcript_lines: u64,
    /// The ground-truth checks, finished, with the core's invariant violations among them.
    pub checker: Checker,
    /// Containers that reached Complete.
    pub completed: usize,
    /// Instances the cloud created.
    pub instances_created: usize,
    /// Instances the cloud still holds at the end.
    pub instances_left: usize,
}

impl ShellRun {
    /// Every ground-truth failure: violations (core invariants, double runs, MaxInstances),
    /// unfinished containers and leaked instances. Empty when the run is clean.
    pub fn failures(&self) -> Vec<String> {
        let mut out = self.checker.violations.clone();
        if self.checker.violation_count > self.checker.violations.len() {
            out.push(format!(
                "... {} violations in all",
                self.checker.violation_count
            ));
        }
        if !self.checker.unfinished.is_empty() {
            out.push(format!(
                "{} containers never ended: {:?}",
                self.checker.unfinished.len(),
                self.checker.unfinished
            ));
        }
        if !self.checker.leaked.is_empty() {
            out.push(format!("leaked instances: {:?}", self.checker.leaked));
        }
        out
    }
}

/// Runs the scenario at `path` through the production shell with `seed` (or the scenario's
/// own), on a current-thread tokio runtime started paused. `log_out` receives the transcript.
pub fn run_file(
    path: &Path,
    seed: Option<u64>,
    log_out: Option<Box<dyn Write>>,
) -> Result<ShellRun, String> {
    let scenario = Scenario::load(path).map_err(|e| e.to_string())?;
    let seed = seed.unwrap_or(scenario.seed);
    let dir = path.parent().unwrap_or(Path::new("."));
    let world = World::new_external(scenario, dir, seed, log_out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("building the paused tokio runtime: {e}"))?;
    Ok(rt.block_on(run_world(world)))
}

/// Runs `world` (built with [`World::new_external`]) through the production shell. Must run on
/// a current-thread runtime with a paused clock to be deterministic.
pub async fn run_world(world: World) -> ShellRun {
    let clock = TokioClock::new(Instant::now());
    let (tx, rx) = mpsc::unbounded_channel();
    let env = Env {
        clock,
        tx: tx.clone(),
    };
    let loaded = world.loaded.clone();
    let options = dispatcher_options(&loaded, world.seed, 0);
    let runner_binary = (!loaded.core.cloud_vms.deploy_runner_binary.is_empty())
        .then(|| Arc::new(b"simulated crunch-run".to_vec()));
    let adapters = Adapters {
        clock: Arc::new(clock),
        api: Arc::new(SimApi(env.clone())),
        cloud: Arc::new(SimCloud(env.clone())),
        executors: Box::new(SimExecutors {
            env: env.clone(),
            hooks: BTreeMap::new(),
        }),
        observer: Some(Arc::new(Recorder(env.clone()))),
        runner_binary,
        // The simulated controller is never dialled; the host only appears in ConfigData.
        config_data: Arc::new(Renderer::for_host(
            &loaded,
            "controller.sim.invalid:443".into(),
            false,
            None,
        )),
    };
    let shell = Shell::with_adapters(&loaded, options, adapters);
    let dispatcher = shell.dispatcher();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
    };
    let (shell_result, mut world) =
        tokio::join!(shell.run(stop), world_task(world, clock, rx, stop_tx));
    if let Err(e) = shell_result {
        world
            .checker
            .violation(world.now, format!("the shell failed: {e:#}"));
    }
    let d = dispatcher
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let w = &mut world;
    w.checker.finish(w.now, &w.api, &w.cloud, &d, &w.loaded);
    let completed = w
        .api
        .rows
        .values()
        .filter(|r| r.c.state == arvados_dispatch_cloud::core::types::ContainerState::Complete)
        .count();
    let _ = w.log.flush();
    ShellRun {
        scenario: w.scenario.name.clone(),
        seed: w.seed,
        end_ms: w.now,
        transcript_hash: w.log.hash_hex(),
        transcript_lines: w.log.lines(),
        checker: w.checker.clone(),
        completed,
        instances_created: w.cloud.created,
        instances_left: w.cloud.instances.len(),
    }
}

/// A request to the world task.
enum Req {
    /// Route a command at `now` and answer with its completions and their due times.
    Route {
        now: u64,
        cmd: Command,
        reply: oneshot::Sender<Vec<(u64, Input)>>,
    },
    /// The shell's core emitted a command (transcript).
    Command(u64, Command),
    /// The shell hands an input to its core (transcript).
    Input(u64, Input),
    /// The shell's core timer fired (transcript).
    Timer(u64),
    /// The shell's core is at rest: its invariant violations and whether it has instances.
    Settled {
        now: u64,
        violations: Vec<String>,
        instances_empty: bool,
    },
}

/// What every adapter holds: the clock and the way to the world task.
#[derive(Clone)]
struct Env {
    clock: TokioClock,
    tx: mpsc::UnboundedSender<Req>,
}

impl Env {
    /// Sends `cmd` to the world's router now; the answer is the completions and their due
    /// instants. `None` once the world task has stopped.
    fn route(&self, cmd: Command) -> oneshot::Receiver<Vec<(u64, Input)>> {
        let (reply, rx) = oneshot::channel();
        let now = self.clock.now().0;
        // A closed channel drops `reply`, and the receiver then reports the world stopped.
        let _ = self.tx.send(Req::Route { now, cmd, reply });
        rx
    }

    fn at(&self, t: u64) -> Instant {
        self.clock.instant(Timestamp(t))
    }
}

fn placeholder(kind: CommandKind) -> Command {
    Command {
        op: PLACEHOLDER_OP,
        deadline: Timestamp(u64::MAX),
        kind,
    }
}

/// The world task: owns the world, answers routes, records the transcript, runs the world's
/// own events (arrivals, crunch-run progress, reclaims, user cancels) when they fall due, and
/// stops the shell when the scenario ends (its duration, or everything ended and settled, or
/// everything ended and no instance is left).
async fn world_task(
    mut world: World,
    clock: TokioClock,
    mut rx: mpsc::UnboundedReceiver<Req>,
    stop: oneshot::Sender<()>,
) -> World {
    let end = millis(world.scenario.duration.0);
    let settle = millis(world.scenario.settle.0);
    let mut core_has_instances = false;
    loop {
        let now = clock.now().0;
        world.advance_external(now);
        let ended = world.ended_all_at();
        if now >= end {
            break;
        }
        if let Some(t) = ended
            && (now >= t + settle || (world.cloud.instances.is_empty() && !core_has_instances))
        {
            break;
        }
        let wake = [world.next_event_at(), Some(end), ended.map(|t| t + settle)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end);
        tokio::select! {
            biased;
            req = rx.recv() => match req {
                Some(Req::Route { now, cmd, reply }) => {
                    world.advance_external(now);
                    let _ = reply.send(world.route_external(now, cmd));
                }
                Some(Req::Command(now, cmd)) => world.log.command(now, &cmd),
                Some(Req::Input(now, input)) => world.log.input(now, &input),
                Some(Req::Timer(now)) => world.log.timer(now),
                Some(Req::Settled { now, violations, instances_empty }) => {
                    for v in violations {
                        world.checker.violation(now, format!("core invariant: {v}"));
                    }
                    core_has_instances = !instances_empty;
                }
                None => break,
            },
            _ = tokio::time::sleep_until(clock.instant(Timestamp(wake))) => {}
        }
    }
    world.now = world.now.max(clock.now().0).min(end);
    let _ = stop.send(());
    world
}

/// The simulated controller.
struct SimApi(Env);

impl ControllerApi for SimApi {
    fn execute(&self, cmd: Command, budget: Duration) -> BoxFuture<'static, Option<Input>> {
        let env = self.0.clone();
        let timeout = timeout_input(&cmd, budget);
        let answer = env.route(cmd);
        let start = Instant::now();
        Box::pin(async move {
            let (at, input) = match answer.await {
                Ok(mut outs) if !outs.is_empty() => outs.remove(0),
                // The world task has stopped: the run is over and the core never sees this.
                _ => return timeout,
            };
            let due = env.at(at);
            if due > start + budget {
                tokio::time::sleep_until(start + budget).await;
                return timeout;
            }
            tokio::time::sleep_until(due).await;
            Some(input)
        })
    }
}

/// The completion an API command gets when its budget runs out (as the controller client's
/// timeout reports it), or `None` for a command that is not an API command.
fn timeout_input(cmd: &Command, budget: Duration) -> Option<Input> {
    let op = cmd.op;
    let err = |what: String| ApiError {
        status: None,
        message: format!("{what} timed out after {budget:?}"),
    };
    Some(match &cmd.kind {
        CommandKind::PollQueue { .. } => Input::QueuePolled {
            op,
            result: Err(err("queue poll".into())),
        },
        CommandKind::Lock { uuid } => Input::ContainerUpdated {
            op,
            result: Err(err(format!("lock {uuid}"))),
        },
        CommandKind::Unlock { uuid } => Input::ContainerUpdated {
            op,
            result: Err(err(format!("unlock {uuid}"))),
        },
        CommandKind::Cancel { uuid } => Input::ContainerUpdated {
            op,
            result: Err(err(format!("cancel {uuid}"))),
        },
        CommandKind::CancelUnsatisfiable { uuid, .. } => Input::UnsatisfiableCancelled {
            op,
            result: Err(err(format!("cancel {uuid} as unsatisfiable"))),
        },
        _ => return None,
    })
}

/// The simulated cloud account.
struct SimCloud(Env);

impl SimCloud {
    fn call<T: Send + 'static>(
        &self,
        kind: CommandKind,
        pick: fn(Input) -> Option<Result<T, CloudError>>,
    ) -> BoxFuture<'static, Result<T, CloudError>> {
        let env = self.0.clone();
        let answer = env.route(placeholder(kind));
        Box::pin(async move {
            let Ok(outs) = answer.await else {
                return Err(world_stopped());
            };
            let Some((at, result)) = outs
                .into_iter()
                .find_map(|(at, input)| pick(input).map(|r| (at, r)))
            else {
                return Err(cloud_error(
                    CloudErrorKind::Permanent,
                    "the simulated cloud gave no completion",
                ));
            };
            tokio::time::sleep_until(env.at(at)).await;
            result
        })
    }
}

fn world_stopped() -> CloudError {
    cloud_error(
        CloudErrorKind::Transient,
        "the simulated world has stopped (the run is over)",
    )
}

impl InstanceSet for SimCloud {
    fn create<'a>(&'a self, req: CreateRequest) -> BoxFuture<'a, Result<InstanceInfo, CloudError>> {
        self.call(
            CommandKind::Create {
                instance_type: req.instance_type,
                image_id: req.image_id,
                tags: req.tags,
                init_command: req.init_command,
                install_public_key: req.public_key.is_some(),
            },
            |i| match i {
                Input::CreateFinished { result, .. } => Some(result),
                _ => None,
            },
        )
    }

    fn list<'a>(
        &'a self,
        filter: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<InstanceInfo>, CloudError>> {
        self.call(
            CommandKind::ListInstances {
                tags: filter.clone(),
            },
            |i| match i {
                Input::InstancesListed { result, .. } => {
                    Some(result.map(|list| list.into_iter().map(Arc::unwrap_or_clone).collect()))
                }
                _ => None,
            },
        )
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), CloudError>> {
        self.call(
            CommandKind::Destroy {
                instance: id.to_string(),
            },
            |i| match i {
                Input::DestroyFinished { result, .. } => Some(result),
                _ => None,
            },
        )
    }

    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        self.call(
            CommandKind::SetTags {
                instance: id.to_string(),
                tags,
            },
            |i| match i {
                Input::TagsSet { result, .. } => Some(result),
                _ => None,
            },
        )
    }

    fn stop<'a>(&'a self) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// The simulated VMs and their crunch-run, reached "over SSH".
struct SimExecutors {
    env: Env,
    hooks: BTreeMap<String, ConnectHook>,
}

impl Executors for SimExecutors {
    fn learn(&mut self, info: &InstanceInfo, on_connect: ConnectHook) {
        self.hooks.insert(info.id.clone(), on_connect);
    }

    fn forget(&mut self, id: &str) {
        self.hooks.remove(id);
    }

    fn exec(
        &self,
        instance: &str,
        command: &str,
        _stdin: Arc<Vec<u8>>,
        deadline: Instant,
    ) -> Option<BoxFuture<'static, Result<ExecOutput, ExecError>>> {
        let hook = Arc::clone(self.hooks.get(instance)?);
        let env = self.env.clone();
        let id = instance.to_string();
        // The world's router reads only the instance and the command line.
        let answer = env.route(placeholder(CommandKind::Exec {
            instance: id.clone(),
            purpose: ExecPurpose::ListProbe,
            command: command.to_string(),
            stdin: ExecStdin::Empty,
        }));
        Some(Box::pin(async move {
            let outs = answer.await.unwrap_or_default();
            let mut connected = false;
            let mut done = None;
            for (at, input) in outs {
                match input {
                    Input::SshConnected { .. } => connected = true,
                    Input::ExecFinished { result, .. } => done = Some((at, result)),
                    _ => {}
                }
            }
            let Some((at, result)) = done else {
                return Err(exec_error(
                    ExecErrorKind::Other,
                    "the simulated world has stopped (the run is over)",
                ));
            };
            let due = env.at(at);
            if due > deadline {
                tokio::time::sleep_until(deadline).await;
                return Err(exec_error(
                    ExecErrorKind::Timeout,
                    "simulated command did not finish before its deadline",
                ));
            }
            tokio::time::sleep_until(due).await;
            if connected {
                hook(&id);
            }
            result
        }))
    }

    fn public_key(&self) -> Option<PublicKey> {
        None
    }
}

fn exec_error(kind: ExecErrorKind, message: &str) -> ExecError {
    ExecError {
        kind,
        stdout: String::new(),
        stderr: String::new(),
        message: message.to_string(),
    }
}

/// Records the shell core's commands, inputs and timer firings in the world's event log, and
/// checks the core's invariants each time it comes to rest.
struct Recorder(Env);

impl Observer for Recorder {
    fn command(&self, now: Timestamp, cmd: &Command) {
        let _ = self.0.tx.send(Req::Command(now.0, cmd.clone()));
    }

    fn input(&self, now: Timestamp, input: &Input) {
        let _ = self.0.tx.send(Req::Input(now.0, input.clone()));
    }

    fn timeout(&self, now: Timestamp) {
        let _ = self.0.tx.send(Req::Timer(now.0));
    }

    fn settled(&self, d: &Dispatcher) {
        let _ = self.0.tx.send(Req::Settled {
            now: d.now().0,
            violations: d.check_invariants(),
            instances_empty: d.instances().is_empty(),
        });
    }
}
