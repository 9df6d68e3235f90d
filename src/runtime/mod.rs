//! The production shell: a tokio loop that owns the core [`Dispatcher`] and carries out its
//! commands through its adapters: in production the controller client, the cloud driver and
//! SSH; in the paused-clock tests the simulator's models (`dispatch-sim`, feature `shell`).
//!
//! The loop follows the core's contract (DESIGN.md, "The core's interface"): after every input,
//! timeout or admin call it drains `poll_command()` to `None`, spawns one task per command, and
//! sleeps until `poll_timeout()`, the next completion, or a wake-up from the management API. Each
//! task is bounded by the deadline the core gave its command and always reports exactly one
//! completion, so an adapter that hangs turns into a timeout error instead of a lost operation.
//! The loop polls its wake-up sources in a fixed order (stop, completions, the core's timer,
//! management wake-ups), so that on a current-thread runtime under tokio's paused clock a run
//! is a function of its adapters' seeds.
//!
//! The adapters ([`Adapters`]) are the only way out: a [`Clock`], a [`ControllerApi`], the cloud
//! [`InstanceSet`] and the [`Executors`] that run remote commands, plus an optional
//! [`Observer`] that sees every command, input and timer firing (tests record a transcript with
//! it). [`Shell::new`] builds the production set; [`Shell::with_adapters`] takes any set.
//!
//! The dispatcher sits behind a `std::sync::Mutex` shared with the management API; nobody holds
//! it across an `await`. In production the time handed to the core is the wall clock in
//! milliseconds since the Unix epoch; the shell clamps every reading so that the core's time
//! never goes backwards.
//!
//! Stopping (SIGTERM, SIGINT) ends the loop and the HTTP server, releases the driver (loopback
//! stops its SSH servers) and destroys nothing: as with the Go dispatcher, the next process
//! recovers every instance from its cloud tags.
//!
//! Secrets (the system root token, the dispatcher's private key, instance secrets) reach the
//! adapters only; no log line or error carries them.

pub mod config_data;
pub mod logging;

/// The SSH public key type of [`Executors::public_key`].
pub use russh::keys::PublicKey;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use md5::{Digest, Md5};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::arvados;
use crate::cloud::{self, BoxFuture, ConnectHook, CreateRequest, InstanceSet};
use crate::config::Loaded;
use crate::core::Dispatcher;
use crate::core::command::{
    CloudErrorKind, Command, CommandKind, ExecError, ExecErrorKind, ExecOutput, ExecStdin, Input,
};
use crate::core::dispatcher::Options;
use crate::core::pool::remote::RunnerSpec;
use crate::core::time::Timestamp;
use crate::core::types::InstanceInfo;
use crate::http;
use crate::ssh::{self, Executor, ExecutorConfig};

/// The current wall-clock time as the core counts it.
pub fn wall_clock() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Timestamp(ms)
}

/// The time as the core counts it, in milliseconds.
pub trait Clock: Send + Sync {
    /// The current time. Readings need not be monotonic; the shell clamps them.
    fn now(&self) -> Timestamp;
}

/// The production clock: [`wall_clock`], milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default)]
pub struct WallClock;

impl Clock for WallClock {
    fn now(&self) -> Timestamp {
        wall_clock()
    }
}

/// A clock that follows tokio's clock (and so its paused, auto-advancing test clock):
/// milliseconds since `origin`.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    origin: Instant,
}

impl TokioClock {
    /// A clock reading 0 at `origin`.
    pub fn new(origin: Instant) -> TokioClock {
        TokioClock { origin }
    }

    /// The instant at which this clock reads `t`.
    pub fn instant(&self, t: Timestamp) -> Instant {
        self.origin + Duration::from_millis(t.0)
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.origin.elapsed().as_millis() as u64)
    }
}

/// The controller, as the shell uses it.
pub trait ControllerApi: Send + Sync {
    /// Carries out an API command of the core within `budget` and returns its completion;
    /// `None` for a command that is not an API command.
    fn execute(&self, cmd: Command, budget: Duration) -> BoxFuture<'static, Option<Input>>;
}

impl ControllerApi for arvados::Client {
    fn execute(&self, cmd: Command, budget: Duration) -> BoxFuture<'static, Option<Input>> {
        let api = self.clone();
        Box::pin(async move { arvados::Client::execute(&api, &cmd, budget).await })
    }
}

/// Remote commands on instances (production: one SSH executor per instance).
///
/// The shell tells it about every instance a create or list result shows (`learn`, again
/// whenever the address or user may have changed) and every instance that left the cloud's
/// list (`forget`).
pub trait Executors: Send {
    /// Learns instance `info`, or updates what is known of it. `on_connect` must be called
    /// each time a connection to it reaches host-key verification.
    fn learn(&mut self, info: &InstanceInfo, on_connect: ConnectHook);

    /// Forgets instance `id` and releases its connection.
    fn forget(&mut self, id: &str);

    /// Starts `command` with `stdin` on instance `instance`, to finish before `deadline`;
    /// `None` if the instance is not known.
    fn exec(
        &self,
        instance: &str,
        command: &str,
        stdin: Arc<Vec<u8>>,
        deadline: Instant,
    ) -> Option<BoxFuture<'static, Result<ExecOutput, ExecError>>>;

    /// The public key to install on new instances (`DeployPublicKey`), if there is one.
    fn public_key(&self) -> Option<PublicKey>;
}

/// Sees what the core sees, in the order it sees it. Tests record a transcript with it;
/// production has none. Every method is called with the dispatcher locked, so it must not
/// lock the dispatcher itself.
pub trait Observer: Send + Sync {
    /// The core emitted `cmd` at `now`.
    fn command(&self, now: Timestamp, cmd: &Command) {
        let _ = (now, cmd);
    }

    /// `input` is about to be handed to the core at `now`.
    fn input(&self, now: Timestamp, input: &Input) {
        let _ = (now, input);
    }

    /// The core's timer fired at `now`.
    fn timeout(&self, now: Timestamp) {
        let _ = now;
    }

    /// The core is at rest: its commands were drained after an input, timeout or wake-up.
    fn settled(&self, dispatcher: &Dispatcher) {
        let _ = dispatcher;
    }
}

/// Everything the shell talks to.
pub struct Adapters {
    /// The core's time.
    pub clock: Arc<dyn Clock>,
    /// The controller.
    pub api: Arc<dyn ControllerApi>,
    /// The cloud account.
    pub cloud: Arc<dyn InstanceSet>,
    /// Remote commands.
    pub executors: Box<dyn Executors>,
    /// Sees every command, input and timer firing, if set.
    pub observer: Option<Arc<dyn Observer>>,
    /// The runner binary to send for `ExecStdin::RunnerBinary`, if loaded.
    pub runner_binary: Option<Arc<Vec<u8>>>,
    /// Renders crunch-run's ConfigData for `ExecStdin::ConfigData`.
    pub config_data: Arc<config_data::Renderer>,
}

impl std::fmt::Debug for Adapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapters")
            .field("observer", &self.observer.is_some())
            .field(
                "runner_binary",
                &self.runner_binary.as_ref().map(|b| b.len()),
            )
            .finish_non_exhaustive()
    }
}

/// Locks the dispatcher. A panic inside the core while locked is a bug; the shell stops rather
/// than drive a core in an unknown state.
fn lock(d: &Mutex<Dispatcher>) -> MutexGuard<'_, Dispatcher> {
    d.lock()
        .expect("the dispatcher mutex is poisoned: the core panicked earlier")
}

/// How the runner binary is deployed: the spec the core needs and the bytes to send.
fn load_runner(loaded: &Loaded) -> (RunnerSpec, Option<Arc<Vec<u8>>>) {
    let c = &loaded.core;
    let path = &c.cloud_vms.deploy_runner_binary;
    if path.is_empty() {
        return (
            RunnerSpec::installed(&c.containers.crunch_run_command),
            None,
        );
    }
    match std::fs::read(path) {
        Ok(bytes) => {
            let md5 = hex(&Md5::digest(&bytes));
            (
                RunnerSpec::deployed(&c.cloud_vms.deploy_runner_directory, &md5),
                Some(Arc::new(bytes)),
            )
        }
        Err(e) => {
            tracing::error!(path = %path, error = %e, "cannot load DeployRunnerBinary");
            (RunnerSpec::unloadable(path, &e.to_string()), None)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A seed for the core's random stream (instance secrets, probe jitter): from the OS.
fn os_seed() -> u64 {
    let mut buf = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        if f.read_exact(&mut buf).is_ok() {
            return u64::from_le_bytes(buf);
        }
    }
    wall_clock().0 ^ u64::from(std::process::id())
}

/// The production [`Executors`]: one SSH executor per instance, verifying host keys through
/// the driver or the instance secret tag.
struct SshExecutors {
    config: ExecutorConfig,
    cloud: Arc<dyn InstanceSet>,
    secret_tag: String,
    instances: BTreeMap<String, Known>,
}

struct Known {
    info: InstanceInfo,
    executor: Executor,
}

impl Executors for SshExecutors {
    fn learn(&mut self, info: &InstanceInfo, on_connect: ConnectHook) {
        let secret = info.tags.get(&self.secret_tag).cloned().unwrap_or_default();
        let target = cloud::ssh_target(Arc::clone(&self.cloud), info, &secret, Some(on_connect));
        match self.instances.get_mut(&info.id) {
            Some(k) => {
                if k.info.address != info.address || k.info.remote_user != info.remote_user {
                    k.executor.set_target(target);
                }
                k.info = info.clone();
            }
            None => {
                let executor = Executor::new(self.config.clone(), target);
                self.instances.insert(
                    info.id.clone(),
                    Known {
                        info: info.clone(),
                        executor,
                    },
                );
            }
        }
    }

    fn forget(&mut self, id: &str) {
        if let Some(k) = self.instances.remove(id) {
            tokio::spawn(async move { k.executor.close().await });
        }
    }

    fn exec(
        &self,
        instance: &str,
        command: &str,
        stdin: Arc<Vec<u8>>,
        deadline: Instant,
    ) -> Option<BoxFuture<'static, Result<ExecOutput, ExecError>>> {
        let executor = self.instances.get(instance)?.executor.clone();
        let command = command.to_string();
        Some(Box::pin(async move {
            ssh::to_core(executor.exec(&command, &stdin, &[], deadline).await)
        }))
    }

    fn public_key(&self) -> Option<PublicKey> {
        Some(self.config.public_key().clone())
    }
}

/// Everything `serve` sets up, before the loop starts. Tests build one and drive it.
pub struct Shell {
    dispatcher: Arc<Mutex<Dispatcher>>,
    wake: Arc<Notify>,
    clock: Arc<dyn Clock>,
    api: Arc<dyn ControllerApi>,
    cloud: Arc<dyn InstanceSet>,
    executors: Box<dyn Executors>,
    observer: Option<Arc<dyn Observer>>,
    runner_binary: Option<Arc<Vec<u8>>>,
    config_data: Arc<config_data::Renderer>,
    /// The IDs of the instances the executors know (from create and list results).
    known: std::collections::BTreeSet<String>,
    secret_tag: String,
    done_tx: mpsc::UnboundedSender<Input>,
    done_rx: mpsc::UnboundedReceiver<Input>,
    management_token: String,
    listen: Option<String>,
}

impl std::fmt::Debug for Shell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shell")
            .field("instances", &self.known.len())
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl Shell {
    /// Sets up the production adapters from a loaded config. Fails with a message naming the
    /// config key when something required is missing or unusable.
    pub async fn new(
        loaded: &Loaded,
        cluster_json: Option<serde_json::Value>,
    ) -> anyhow::Result<Shell> {
        let controller = loaded.controller_url.as_deref().ok_or_else(|| {
            anyhow!("Services.Controller.ExternalURL is not set: the dispatcher cannot reach the controller")
        })?;
        if loaded.secrets.system_root_token.is_empty() {
            return Err(anyhow!("SystemRootToken is empty"));
        }
        let api = arvados::Client::new(
            controller,
            &loaded.secrets.system_root_token,
            loaded.tls_insecure,
        )
        .context("setting up the controller client")?;
        let key = ssh::load_private_key(&loaded.secrets.dispatch_private_key)
            .context("Containers.DispatchPrivateKey")?;
        let ssh = ExecutorConfig::new(key, loaded.core.cloud_vms.ssh_port.clone());
        let cloud =
            cloud::new_instance_set(&loaded.core.cloud_vms.driver, &loaded.driver_parameters)
                .await
                .with_context(|| {
                    format!(
                        "Containers.CloudVMs.Driver {:?} with its DriverParameters",
                        loaded.core.cloud_vms.driver
                    )
                })?;
        let (runner, runner_binary) = load_runner(loaded);
        let config_data = Arc::new(config_data::Renderer::new(loaded, &api, cluster_json));
        let executors = SshExecutors {
            config: ssh,
            cloud: Arc::clone(&cloud),
            secret_tag: secret_tag(loaded),
            instances: BTreeMap::new(),
        };
        let options = Options {
            seed: os_seed(),
            instance_set_id: loaded.instance_set_id.clone(),
            runner,
        };
        let adapters = Adapters {
            clock: Arc::new(WallClock),
            api: Arc::new(api),
            cloud,
            executors: Box::new(executors),
            observer: None,
            runner_binary,
            config_data,
        };
        Ok(Shell::with_adapters(loaded, options, adapters))
    }

    /// A shell for `loaded` whose core starts with `options` and which talks to the world only
    /// through `adapters`. The management API listens where `loaded` says, if anywhere.
    pub fn with_adapters(loaded: &Loaded, options: Options, adapters: Adapters) -> Shell {
        let now = adapters.clock.now();
        let dispatcher = Dispatcher::new(loaded.core.clone(), options, now);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Shell {
            dispatcher: Arc::new(Mutex::new(dispatcher)),
            wake: Arc::new(Notify::new()),
            clock: adapters.clock,
            api: adapters.api,
            cloud: adapters.cloud,
            executors: adapters.executors,
            observer: adapters.observer,
            runner_binary: adapters.runner_binary,
            config_data: adapters.config_data,
            known: std::collections::BTreeSet::new(),
            secret_tag: secret_tag(loaded),
            done_tx,
            done_rx,
            management_token: loaded.secrets.management_token.clone(),
            listen: loaded.listen_host_port(),
        }
    }

    /// The dispatcher, shared with the management API.
    pub fn dispatcher(&self) -> Arc<Mutex<Dispatcher>> {
        Arc::clone(&self.dispatcher)
    }

    /// The management API's state for this shell; its metrics include the cloud driver's.
    pub fn api_state(&self) -> http::ApiState {
        let clock = Arc::clone(&self.clock);
        let cloud = Arc::clone(&self.cloud);
        http::ApiState::new(
            Arc::clone(&self.dispatcher),
            Arc::clone(&self.wake),
            self.management_token.clone(),
            Arc::new(move || clock.now()),
        )
        .with_extra_metrics(Arc::new(move || cloud.metrics()))
    }

    /// Serves the management API on the configured address (if any) and runs the loop until
    /// `shutdown` completes. Nothing is destroyed on the way out.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = Arc::new(Notify::new());
        let server = match self.listen.clone() {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| {
                        format!("listening on {addr} (Services.DispatchCloud.InternalURLs)")
                    })?;
                tracing::info!(address = %addr, "management API listening");
                let app = http::router(self.api_state());
                let stop = Arc::clone(&stop);
                Some(tokio::spawn(async move {
                    let r = axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stop.notified().await })
                        .await;
                    if let Err(e) = r {
                        tracing::error!(error = %e, "management API server failed");
                    }
                }))
            }
            None => {
                tracing::warn!(
                    "no Services.DispatchCloud.InternalURLs entry for this host: management API disabled"
                );
                None
            }
        };
        let mut shutdown = Box::pin(shutdown);
        loop {
            let timeout = self.drain();
            let sleep = async {
                match timeout {
                    Some(t) => {
                        let now = self.clock.now();
                        tokio::time::sleep(Duration::from_millis(t.0.saturating_sub(now.0))).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(input) = self.done_rx.recv() => self.deliver(input),
                _ = sleep => {
                    let mut d = lock(&self.dispatcher);
                    let now = self.clock.now().max(d.now());
                    if let Some(o) = &self.observer {
                        o.timeout(now);
                    }
                    d.handle_timeout(now);
                }
                _ = self.wake.notified() => {}
            }
        }
        tracing::info!("stopping: instances are left running for the next dispatcher to adopt");
        stop.notify_waiters();
        if let Some(h) = server {
            let _ = h.await;
        }
        self.cloud.stop().await;
        Ok(())
    }

    /// Drains the core's commands into tasks; returns its next wake-up time.
    fn drain(&mut self) -> Option<Timestamp> {
        let mut cmds = Vec::new();
        let timeout = {
            let mut d = lock(&self.dispatcher);
            while let Some(c) = d.poll_command() {
                cmds.push(c);
            }
            if let Some(o) = &self.observer {
                let now = d.now();
                for c in &cmds {
                    o.command(now, c);
                }
                o.settled(&d);
            }
            d.poll_timeout()
        };
        for c in cmds {
            self.spawn(c);
        }
        timeout
    }

    /// Hands a completion to the core, keeping the executors in step with the instances.
    fn deliver(&mut self, input: Input) {
        match &input {
            Input::CreateFinished {
                result: Ok(info), ..
            } => self.learn(info),
            Input::InstancesListed {
                result: Ok(list), ..
            } => {
                for info in list {
                    self.learn(info);
                }
            }
            _ => {}
        }
        let prune = matches!(
            input,
            Input::InstancesListed { result: Ok(_), .. }
                | Input::DestroyFinished { result: Ok(_), .. }
        );
        let gone: Vec<String> = {
            let mut d = lock(&self.dispatcher);
            let now = self.clock.now().max(d.now());
            if let Some(o) = &self.observer {
                o.input(now, &input);
            }
            d.handle_input(now, input);
            // An executor goes when the core no longer has the worker, not merely when a
            // list missed it: a list that started before a create finished does not show the
            // new instance yet, and its boot probe must still reach it.
            if prune {
                let workers = d.pool().workers();
                self.known
                    .iter()
                    .filter(|id| !workers.contains_key(id.as_str()))
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            }
        };
        for id in gone {
            self.known.remove(&id);
            self.executors.forget(&id);
        }
    }

    fn learn(&mut self, info: &InstanceInfo) {
        let tx = self.done_tx.clone();
        let hook: ConnectHook = Arc::new(move |id: &str| {
            let _ = tx.send(Input::SshConnected {
                instance: id.to_string(),
            });
        });
        self.known.insert(info.id.clone());
        self.executors.learn(info, hook);
    }

    /// Runs one command as a task bounded by its deadline; its completion comes back through
    /// the channel.
    fn spawn(&mut self, cmd: Command) {
        let tx = self.done_tx.clone();
        let now = self.clock.now();
        let budget = Duration::from_millis(cmd.deadline.0.saturating_sub(now.0).max(1));
        let deadline = Instant::now() + budget;
        let op = cmd.op;
        match &cmd.kind {
            CommandKind::PollQueue { .. }
            | CommandKind::Lock { .. }
            | CommandKind::Unlock { .. }
            | CommandKind::Cancel { .. }
            | CommandKind::CancelUnsatisfiable { .. } => {
                let call = self.api.execute(cmd, budget);
                tokio::spawn(async move {
                    if let Some(input) = call.await {
                        let _ = tx.send(input);
                    }
                });
            }
            CommandKind::Create {
                instance_type,
                image_id,
                tags,
                init_command,
                install_public_key,
            } => {
                let req = CreateRequest {
                    instance_type: Arc::clone(instance_type),
                    image_id: image_id.clone(),
                    tags: tags.clone(),
                    init_command: init_command.clone(),
                    public_key: if *install_public_key {
                        self.executors.public_key()
                    } else {
                        None
                    },
                };
                let set = Arc::clone(&self.cloud);
                let secret_tag = self.secret_tag.clone();
                tokio::spawn(async move {
                    let want = req.tags.clone();
                    let result = match tokio::time::timeout_at(deadline, set.create(req)).await {
                        Ok(r) => r.map(|mut info| {
                            // The shell needs the secret to verify the host; keep it even if
                            // the driver's answer has no tags yet.
                            if let Some(s) = want.get(&secret_tag) {
                                info.tags.entry(secret_tag).or_insert_with(|| s.clone());
                            }
                            info
                        }),
                        Err(_) => Err(timed_out("create", budget)),
                    };
                    let _ = tx.send(Input::CreateFinished { op, result });
                });
            }
            CommandKind::Destroy { instance } => {
                let set = Arc::clone(&self.cloud);
                let id = instance.clone();
                tokio::spawn(async move {
                    let result = tokio::time::timeout_at(deadline, set.destroy(&id))
                        .await
                        .unwrap_or_else(|_| Err(timed_out("destroy", budget)));
                    let _ = tx.send(Input::DestroyFinished { op, result });
                });
            }
            CommandKind::ListInstances { tags } => {
                let set = Arc::clone(&self.cloud);
                let tags = tags.clone();
                tokio::spawn(async move {
                    let result = tokio::time::timeout_at(deadline, set.list(&tags))
                        .await
                        .unwrap_or_else(|_| Err(timed_out("list", budget)))
                        .map(|list| list.into_iter().map(Arc::new).collect());
                    let _ = tx.send(Input::InstancesListed { op, result });
                });
            }
            CommandKind::SetTags { instance, tags } => {
                let set = Arc::clone(&self.cloud);
                let (id, tags) = (instance.clone(), tags.clone());
                tokio::spawn(async move {
                    let result = tokio::time::timeout_at(deadline, set.set_tags(&id, tags))
                        .await
                        .unwrap_or_else(|_| Err(timed_out("set tags", budget)));
                    let _ = tx.send(Input::TagsSet { op, result });
                });
            }
            CommandKind::Exec {
                instance,
                command,
                stdin,
                ..
            } => {
                let stdin = match stdin {
                    ExecStdin::Empty => Ok(Arc::new(Vec::new())),
                    ExecStdin::RunnerBinary => self
                        .runner_binary
                        .clone()
                        .ok_or_else(|| "DeployRunnerBinary is not loaded".to_string()),
                    ExecStdin::ConfigData {
                        uuid,
                        instance_type,
                        address,
                    } => Ok(Arc::new(
                        self.config_data
                            .render(uuid, instance_type, address)
                            .into_bytes(),
                    )),
                    ExecStdin::Text(text) => Ok(Arc::new(text.clone().into_bytes())),
                };
                let call = match stdin {
                    Err(message) => Err(ExecError {
                        kind: ExecErrorKind::Other,
                        stdout: String::new(),
                        stderr: String::new(),
                        message,
                    }),
                    Ok(stdin) => self
                        .executors
                        .exec(instance, command, stdin, deadline)
                        .ok_or_else(|| ExecError {
                            kind: ExecErrorKind::NoAddress,
                            stdout: String::new(),
                            stderr: String::new(),
                            message: format!("instance {instance} is not known to the shell yet"),
                        }),
                };
                tokio::spawn(async move {
                    let result = match call {
                        Ok(call) => call.await,
                        Err(e) => Err(e),
                    };
                    let _ = tx.send(Input::ExecFinished { op, result });
                });
            }
        }
    }
}

/// The name of the tag that carries an instance's secret.
fn secret_tag(loaded: &Loaded) -> String {
    format!("{}InstanceSecret", loaded.core.cloud_vms.tag_key_prefix)
}

fn timed_out(what: &str, after: Duration) -> cloud::CloudError {
    cloud::cloud_error(
        CloudErrorKind::Transient,
        format!("cloud {what} call timed out after {after:?}"),
    )
}

/// `arvados-dispatch-cloud serve`: sets up the shell from `loaded` and runs it until SIGTERM or
/// SIGINT.
pub async fn serve(loaded: Loaded, cluster_json: Option<serde_json::Value>) -> anyhow::Result<()> {
    let shell = Shell::new(&loaded, cluster_json).await?;
    tracing::info!(cluster = %loaded.cluster_id, driver = %loaded.core.cloud_vms.driver,
        "dispatcher started");
    shell.run(shutdown_signal()).await
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stopping only on Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
