//! The loopback driver (reference-workers.md §6.4): "instances" are in-process SSH servers on
//! 127.0.0.1 that run commands on this host, so a whole dispatcher can run on one machine.
//!
//! Differences from Go, required by this project:
//! * At most `MaxInstances` instances (DriverParameters, default 1); a create past it returns a
//!   Quota error "loopback driver is always at quota".
//! * Instance state (ID, port, host key, authorised key, tags) is kept in a JSON state file
//!   (`StateFile`, default [`DEFAULT_STATE_FILE`]), written atomically with mode 0600 after every
//!   change. A new driver reloads it and restarts each instance's SSH server with the same host
//!   key, on the same port if it is free (else a new one), so a restarted dispatcher recovers its
//!   instances and their crunch-run processes.
//! * `/var/lock/crunch-run-broken` (or any path) is deleted at create only if `BrokenFlagFile`
//!   is set.
//! * Destroy stops the instance's SSH server (Go leaves it running until Stop).
//!
//! Each server accepts only the public key passed to create (any user name), accepts `env`
//! requests, and runs the first `exec` as `sh -c <command>` with a leading `sudo ` stripped, in a
//! new session (setsid), with the env vars added to this process's environment and the channel's
//! data as stdin. The exit code becomes the SSH exit status (1 if the process died without one).
//! When the client closes the channel or disconnects first, the command's process group is
//! killed, so a command the dispatcher gave up on does not linger.
//!
//! Invariant: host private keys live only in memory and in the state file (mode 0600); they are
//! never logged and never part of an error.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{
    Auth, ChannelOpenHandle, Msg, RunningServerHandle, Server as _, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelMsg};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::{
    BoxFuture, CloudError, CloudErrorKind, CreateRequest, InstanceInfo, InstanceSet, cloud_error,
};
use crate::ssh::{HostKeyError, UnverifiedConnection};

/// Where the state file goes unless `StateFile` says otherwise.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/arvados-dispatch-cloud/loopback-state.json";

/// The Quota error text (exact, from Go).
pub const QUOTA_MESSAGE: &str = "loopback driver is always at quota";

/// The most stdin bytes buffered for a command that does not read them.
const MAX_PENDING_STDIN: usize = 256 << 20;

/// How long stopping a server may take before it is abandoned.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The loopback driver's `DriverParameters`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopbackParams {
    /// `MaxInstances` (default 1).
    pub max_instances: usize,
    /// `StateFile` (default [`DEFAULT_STATE_FILE`]).
    pub state_file: PathBuf,
    /// `BrokenFlagFile`: deleted at each create when set (Go: `/var/lock/crunch-run-broken`).
    pub broken_flag_file: Option<PathBuf>,
}

impl Default for LoopbackParams {
    fn default() -> Self {
        LoopbackParams {
            max_instances: 1,
            state_file: PathBuf::from(DEFAULT_STATE_FILE),
            broken_flag_file: None,
        }
    }
}

impl LoopbackParams {
    /// Reads `MaxInstances`, `StateFile` and `BrokenFlagFile` from the DriverParameters object
    /// (other keys are ignored; a missing or null object gives the defaults).
    pub fn from_driver_parameters(v: &serde_json::Value) -> Result<Self, LoopbackError> {
        let mut p = LoopbackParams::default();
        let obj = match v {
            serde_json::Value::Null => return Ok(p),
            serde_json::Value::Object(o) => o,
            _ => {
                return Err(LoopbackError::BadParameter {
                    key: "DriverParameters".into(),
                    reason: "must be an object".into(),
                });
            }
        };
        if let Some(m) = obj.get("MaxInstances") {
            p.max_instances = m
                .as_u64()
                .or_else(|| m.as_str().and_then(|s| s.trim().parse().ok()))
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| LoopbackError::BadParameter {
                    key: "MaxInstances".into(),
                    reason: format!("{m} is not a non-negative integer"),
                })?;
        }
        let path = |key: &str| -> Result<Option<PathBuf>, LoopbackError> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(PathBuf::from(s))),
                Some(other) => Err(LoopbackError::BadParameter {
                    key: key.into(),
                    reason: format!("{other} is not a path string"),
                }),
            }
        };
        if let Some(s) = path("StateFile")? {
            p.state_file = s;
        }
        p.broken_flag_file = path("BrokenFlagFile")?;
        Ok(p)
    }
}

/// A loopback driver setup failure.
#[derive(Debug, thiserror::Error)]
pub enum LoopbackError {
    /// A DriverParameters value is wrong.
    #[error("loopback DriverParameters.{key}: {reason}")]
    BadParameter {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The state file exists but cannot be read or parsed.
    #[error("loopback state file {path}: {reason}")]
    State {
        /// The path.
        path: String,
        /// What failed.
        reason: String,
    },
    /// An instance's SSH server could not be started again.
    #[error("loopback instance {id}: cannot restart its SSH server: {reason}")]
    Restart {
        /// Instance ID.
        id: String,
        /// What failed.
        reason: String,
    },
}

/// One instance as the state file keeps it.
#[derive(Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    provider_type: String,
    port: u16,
    /// OpenSSH private key text.
    host_key: String,
    /// The authorised client key (`authorized_keys` line), if any.
    authorized_key: Option<String>,
    tags: BTreeMap<String, String>,
}

#[derive(Default, Serialize, Deserialize)]
struct StateFile {
    instances: Vec<Record>,
}

struct Live {
    record: Record,
    host_public: PublicKey,
    server: ServerHandle,
}

struct State {
    instances: BTreeMap<String, Live>,
}

/// The loopback instance set.
pub struct Loopback {
    params: LoopbackParams,
    remote_user: String,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for Loopback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loopback")
            .field("params", &self.params)
            .field("remote_user", &self.remote_user)
            .finish_non_exhaustive()
    }
}

impl Loopback {
    /// A driver with `params`. If the state file exists, its instances come back, each with its
    /// SSH server restarted (same host key; same port if free).
    pub async fn new(params: LoopbackParams) -> Result<Loopback, LoopbackError> {
        let remote_user = current_user();
        let saved = read_state(&params.state_file)?;
        let mut instances = BTreeMap::new();
        let mut moved = false;
        for mut record in saved.instances {
            let restart_err = |reason: String| LoopbackError::Restart {
                id: record.id.clone(),
                reason,
            };
            let key = PrivateKey::from_openssh(&record.host_key)
                .map_err(|e| restart_err(format!("bad host key in the state file: {e}")))?;
            let authorized = match &record.authorized_key {
                Some(line) => Some(
                    PublicKey::from_openssh(line.trim())
                        .map_err(|e| restart_err(format!("bad authorized key: {e}")))?,
                ),
                None => None,
            };
            let host_public = key.public_key().clone();
            let server = match start_server(record.port, key.clone(), authorized.clone()).await {
                Ok(s) => s,
                Err(_) => start_server(0, key, authorized)
                    .await
                    .map_err(|e| restart_err(e.to_string()))?,
            };
            if server.port != record.port {
                tracing::warn!(
                    instance = %record.id,
                    old_port = record.port,
                    new_port = server.port,
                    "loopback instance's port was taken; its SSH server moved"
                );
                record.port = server.port;
                moved = true;
            }
            tracing::info!(instance = %record.id, port = record.port, "loopback instance recovered");
            instances.insert(
                record.id.clone(),
                Live {
                    record,
                    host_public,
                    server,
                },
            );
        }
        let driver = Loopback {
            params,
            remote_user,
            state: tokio::sync::Mutex::new(State { instances }),
        };
        if moved {
            let st = driver.state.lock().await;
            driver.save(&st).map_err(|reason| LoopbackError::State {
                path: driver.params.state_file.display().to_string(),
                reason,
            })?;
        }
        Ok(driver)
    }

    /// The driver's parameters.
    pub fn params(&self) -> &LoopbackParams {
        &self.params
    }

    /// The host public key of instance `id`, if it exists.
    pub async fn host_public_key(&self, id: &str) -> Option<PublicKey> {
        let st = self.state.lock().await;
        st.instances.get(id).map(|l| l.host_public.clone())
    }

    fn info(&self, r: &Record) -> InstanceInfo {
        InstanceInfo {
            id: r.id.clone(),
            address: format!("127.0.0.1:{}", r.port),
            provider_type: r.provider_type.clone(),
            tags: r.tags.clone(),
            remote_user: self.remote_user.clone(),
            ..InstanceInfo::default()
        }
    }

    /// Writes the state file atomically (temp file, mode 0600, rename).
    fn save(&self, st: &State) -> Result<(), String> {
        let file = StateFile {
            instances: st.instances.values().map(|l| l.record.clone()).collect(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
        let path = &self.params.state_file;
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            std::io::Write::write_all(&mut f, &json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| format!("write {}: {e}", path.display()))
    }

    fn save_or_error(&self, st: &State) -> Result<(), CloudError> {
        self.save(st).map_err(|reason| {
            cloud_error(
                CloudErrorKind::Transient,
                format!("loopback driver cannot save its state: {reason}"),
            )
        })
    }

    async fn do_create(&self, req: CreateRequest) -> Result<InstanceInfo, CloudError> {
        let mut st = self.state.lock().await;
        if st.instances.len() >= self.params.max_instances {
            return Err(cloud_error(CloudErrorKind::Quota, QUOTA_MESSAGE));
        }
        // A crunch-run process of an earlier instance may have marked this host broken; a
        // destroy and create does not repair a loopback host, so the flag goes.
        if let Some(flag) = &self.params.broken_flag_file {
            match std::fs::remove_file(flag) {
                Ok(()) => tracing::info!(path = %flag.display(), "removed the broken-node flag"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(cloud_error(
                        CloudErrorKind::Permanent,
                        format!("cannot remove {}: {e}", flag.display()),
                    ));
                }
            }
        }
        let provider_type = req.instance_type.provider_type.clone();
        let id = unique_id(&provider_type, |c| st.instances.contains_key(c));
        let key = new_host_key().map_err(|e| {
            cloud_error(
                CloudErrorKind::Transient,
                format!("cannot generate a host key: {e}"),
            )
        })?;
        let host_text = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| cloud_error(CloudErrorKind::Permanent, format!("encode host key: {e}")))?
            .to_string();
        let authorized_key = match &req.public_key {
            Some(k) => Some(k.to_openssh().map_err(|e| {
                cloud_error(
                    CloudErrorKind::Permanent,
                    format!("encode the public key: {e}"),
                )
            })?),
            None => None,
        };
        let host_public = key.public_key().clone();
        let server = start_server(0, key, req.public_key.clone())
            .await
            .map_err(|e| {
                cloud_error(
                    CloudErrorKind::Transient,
                    format!("cannot start the SSH server: {e}"),
                )
            })?;
        let record = Record {
            id: id.clone(),
            provider_type,
            port: server.port,
            host_key: host_text,
            authorized_key,
            tags: req.tags,
        };
        let info = self.info(&record);
        st.instances.insert(
            id.clone(),
            Live {
                record,
                host_public,
                server,
            },
        );
        if let Err(e) = self.save_or_error(&st) {
            if let Some(live) = st.instances.remove(&id) {
                live.server.stop().await;
            }
            return Err(e);
        }
        tracing::info!(instance = %id, address = %info.address, "loopback instance created");
        Ok(info)
    }
}

impl InstanceSet for Loopback {
    fn create<'a>(&'a self, req: CreateRequest) -> BoxFuture<'a, Result<InstanceInfo, CloudError>> {
        Box::pin(self.do_create(req))
    }

    fn list<'a>(
        &'a self,
        filter: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<InstanceInfo>, CloudError>> {
        Box::pin(async move {
            let st = self.state.lock().await;
            Ok(st
                .instances
                .values()
                .filter(|l| {
                    filter
                        .iter()
                        .all(|(k, v)| l.record.tags.get(k).is_some_and(|t| t == v))
                })
                .map(|l| self.info(&l.record))
                .collect())
        })
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(async move {
            let mut st = self.state.lock().await;
            let Some(live) = st.instances.remove(id) else {
                return Err(cloud_error(
                    CloudErrorKind::NotFound,
                    format!("loopback instance {id:?} not found"),
                ));
            };
            live.server.stop().await;
            self.save_or_error(&st)?;
            tracing::info!(instance = %id, "loopback instance destroyed");
            Ok(())
        })
    }

    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(async move {
            let mut st = self.state.lock().await;
            let Some(live) = st.instances.get_mut(id) else {
                return Err(cloud_error(
                    CloudErrorKind::NotFound,
                    format!("loopback instance {id:?} not found"),
                ));
            };
            live.record.tags = tags;
            self.save_or_error(&st)
        })
    }

    fn verify_host_key<'a>(
        &'a self,
        id: &'a str,
        key: &'a PublicKey,
        _conn: &'a UnverifiedConnection<'a>,
    ) -> BoxFuture<'a, Result<(), HostKeyError>> {
        Box::pin(async move {
            let st = self.state.lock().await;
            match st.instances.get(id) {
                Some(l) if l.host_public.key_data() == key.key_data() => Ok(()),
                Some(_) => Err(HostKeyError::Rejected("host key mismatch".into())),
                None => Err(HostKeyError::Rejected(format!(
                    "loopback instance {id:?} not found"
                ))),
            }
        })
    }

    fn stop<'a>(&'a self) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut st = self.state.lock().await;
            for live in st.instances.values_mut() {
                live.server.stop_in_place().await;
            }
        })
    }
}

/// `base` if `taken` says it is free, else `base-2`, `base-3`, ...
fn unique_id(base: &str, taken: impl Fn(&str) -> bool) -> String {
    let base = if base.is_empty() { "loopback" } else { base };
    if !taken(base) {
        return base.to_string();
    }
    (2u64..)
        .map(|n| format!("{base}-{n}"))
        .find(|c| !taken(c))
        .expect("an unbounded range has a free name")
}

/// The user this process runs as (the loopback instances' remote user).
fn current_user() -> String {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if let (Some(uid), Ok(passwd)) = (uid, std::fs::read_to_string("/etc/passwd")) {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 2 && f[2].parse::<u32>().ok() == Some(uid) {
                return f[0].to_string();
            }
        }
    }
    match (std::env::var("USER"), uid) {
        (Ok(u), _) if !u.is_empty() => u,
        (_, Some(0)) => "root".into(),
        (_, Some(uid)) => uid.to_string(),
        (_, None) => "root".into(),
    }
}

/// A new Ed25519 host key seeded from the OS's random source.
fn new_host_key() -> std::io::Result<PrivateKey> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    seed.fill(0);
    Ok(key)
}

fn read_state(path: &Path) -> Result<StateFile, LoopbackError> {
    let err = |reason: String| LoopbackError::State {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(e) => Err(err(e.to_string())),
    }
}

/// A running per-instance SSH server.
struct ServerHandle {
    port: u16,
    shutdown: RunningServerHandle,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl ServerHandle {
    async fn stop(mut self) {
        self.stop_in_place().await;
    }

    async fn stop_in_place(&mut self) {
        self.shutdown.shutdown("loopback instance stopped".into());
        if let Some(join) = self.join.take() {
            let abort = join.abort_handle();
            if tokio::time::timeout(STOP_GRACE, join).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.shutdown("loopback driver dropped".into());
        if let Some(join) = self.join.take() {
            join.abort();
        }
    }
}

async fn start_server(
    port: u16,
    host_key: PrivateKey,
    authorized: Option<PublicKey>,
) -> std::io::Result<ServerHandle> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let port = listener.local_addr()?.port();
    let config = Arc::new(russh::server::Config {
        keys: vec![host_key],
        auth_rejection_time: Duration::from_millis(50),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let join = tokio::spawn(async move {
        let mut server = SshServer { authorized };
        let running = server.run_on_socket(config, &listener);
        let _ = tx.send(running.handle());
        if let Err(e) = running.await {
            tracing::warn!(port, error = %e, "loopback SSH server stopped");
        }
    });
    let shutdown = rx
        .await
        .map_err(|_| std::io::Error::other("the SSH server task ended at start"))?;
    Ok(ServerHandle {
        port,
        shutdown,
        join: Some(join),
    })
}

#[derive(Clone)]
struct SshServer {
    authorized: Option<PublicKey>,
}

impl russh::server::Server for SshServer {
    type Handler = SshSession;
    fn new_client(&mut self, _peer: Option<std::net::SocketAddr>) -> SshSession {
        SshSession {
            authorized: self.authorized.clone(),
        }
    }
}

struct SshSession {
    authorized: Option<PublicKey>,
}

impl russh::server::Handler for SshSession {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // Like Go's test.SSHService, the user name is not checked.
        match &self.authorized {
            Some(k) if k.key_data() == key.public_key.key_data() => Ok(Auth::Accept),
            _ => Ok(Auth::reject()),
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        tokio::spawn(serve_channel(channel));
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _command: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }
}

/// Runs the channel's command: collects env vars until `exec`, then runs it with the channel's
/// data as stdin, and reports its output and exit status.
async fn serve_channel(channel: Channel<Msg>) {
    let (mut read, write) = channel.split();
    let mut env = Vec::new();
    let command = loop {
        match read.wait().await {
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => env.push((variable_name, variable_value)),
            Some(ChannelMsg::Exec { command, .. }) => break command,
            Some(ChannelMsg::Close) | None => return,
            Some(_) => {}
        }
    };
    let command = String::from_utf8_lossy(&command).into_owned();
    let command = command
        .strip_prefix("sudo ")
        .unwrap_or(&command)
        .to_string();

    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&command)
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of this process; it runs in
    // the forked child before exec, as Go's SysProcAttr{Setsid: true} does.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("loopback: cannot run sh: {e}\n");
            let _ = write.extended_data(1, msg.as_bytes()).await;
            let _ = write.exit_status(1).await;
            let _ = write.eof().await;
            let _ = write.close().await;
            return;
        }
    };
    let pid = child.id();
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        kill_group(pid);
        let _ = write.exit_status(1).await;
        let _ = write.close().await;
        return;
    };

    // Stdin is written by its own task, so a command that does not read it blocks neither its
    // output nor the detection of a closed channel.
    let pending = Arc::new(AtomicUsize::new(0));
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let writer_pending = pending.clone();
    tokio::spawn(async move {
        while let Some(data) = stdin_rx.recv().await {
            writer_pending.fetch_sub(data.len(), Ordering::Relaxed);
            if stdin.write_all(&data).await.is_err() {
                break;
            }
        }
        // Dropping stdin closes the pipe: the command sees EOF.
    });
    let mut stdin_tx = Some(stdin_tx);

    let mut out_w = write.make_writer();
    let mut err_w = write.make_writer_ext(Some(1));
    let io = tokio::spawn(async move {
        let (_, _) = tokio::join!(
            tokio::io::copy(&mut stdout, &mut out_w),
            tokio::io::copy(&mut stderr, &mut err_w),
        );
        match child.wait().await {
            // A command killed by a signal has no code: Go reports 1.
            Ok(status) => status
                .code()
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(1),
            Err(_) => 1,
        }
    });
    tokio::pin!(io);
    loop {
        tokio::select! {
            status = &mut io => {
                let status = status.unwrap_or(1);
                let _ = write.exit_status(status).await;
                let _ = write.eof().await;
                let _ = write.close().await;
                return;
            }
            msg = read.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if let Some(tx) = &stdin_tx {
                        let n = pending.fetch_add(data.len(), Ordering::Relaxed) + data.len();
                        if n > MAX_PENDING_STDIN || tx.send(data.to_vec()).is_err() {
                            stdin_tx = None;
                        }
                    }
                }
                Some(ChannelMsg::Eof) => stdin_tx = None,
                Some(ChannelMsg::Close) | None => {
                    // The client gave up (deadline) or went away: end the command.
                    kill_group(pid);
                    return;
                }
                Some(_) => {}
            },
        }
    }
}

/// SIGKILLs the process group led by `pid` (the command ran in its own session).
fn kill_group(pid: Option<u32>) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; a negative PID names the group.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}
