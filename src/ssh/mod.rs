//! The SSH executor (russh client, ring backend) with host-key verification through the
//! instance secret (reference-workers.md §5).
//!
//! One [`Executor`] serves one worker. It keeps one multiplexed SSH connection to the worker and
//! opens a new session channel for every command, so probes, starts and kills run concurrently.
//! If opening a session on the current connection fails, it dials a new connection exactly once
//! and retries; a failed command itself is never retried (the next probe tick is the retry).
//! Concurrent callers that find a dial in progress wait for it and share its result instead of
//! dialling themselves.
//!
//! Every step (TCP connect, handshake, authentication, host-key verification, the command) is
//! bounded by the deadline the caller passes. A command still running at its deadline returns
//! [`SshError::Timeout`] and its channel is closed.
//!
//! Host keys: the dial accepts any key and records it. If no key has been verified yet, or the
//! presented key differs from the last one verified, the target's [`HostKeyVerifier`] decides,
//! and it may run commands on the new, unverified connection ([`UnverifiedConnection`]). On
//! failure the new connection is closed (Go leaks it) and the error returned. A verified key is
//! remembered, so reconnects presenting the same key skip verification.
//!
//! Invariant: the dispatcher's private key never appears in a log line, an error or `Debug`
//! output; [`ExecutorConfig`]'s `Debug` prints only the key's fingerprint.

mod address;
mod session;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use tokio::time::{Instant, timeout_at};

use crate::core::command as core_cmd;

pub use address::{DEFAULT_SSH_PORT, resolve_address};

/// A boxed, sendable future (the object-safe shape of the async traits here and in `cloud`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The remote command that prints the instance secret (§5.3), before any `sudo ` prefix.
pub const INSTANCE_SECRET_COMMAND: &str = "cat /var/run/arvados-instance-secret";

/// The error text when the instance secret does not match (§5.3, exact).
pub const BAD_INSTANCE_SECRET: &str = "bad instance secret";

/// A failed SSH operation. Messages name the address and never contain key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SshError {
    /// The instance has no address yet.
    #[error("instance has no address")]
    NoAddress,
    /// The address (or the configured port) cannot be parsed.
    #[error("bad SSH address {address:?}: {reason}")]
    BadAddress {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCP connection failed (refused, unreachable, unresolvable).
    #[error("dial tcp {address}: {reason}")]
    Connect {
        /// `host:port`.
        address: String,
        /// The OS error.
        reason: String,
    },
    /// The SSH handshake failed or the connection broke during it.
    #[error("ssh handshake with {address} failed: {reason}")]
    Handshake {
        /// `host:port`.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The server refused the dispatcher's public key.
    #[error("ssh: unable to authenticate as {user:?} at {address} with the dispatcher's key")]
    Auth {
        /// `host:port`.
        address: String,
        /// The remote user.
        user: String,
    },
    /// The host key could not be verified (for example `bad instance secret`).
    #[error("host key verification for {address} failed: {reason}")]
    HostKey {
        /// `host:port`.
        address: String,
        /// The verifier's error.
        reason: String,
    },
    /// The deadline passed.
    #[error("{what} on {address}: deadline exceeded")]
    Timeout {
        /// `host:port` (or the address as given).
        address: String,
        /// The step that was running.
        what: &'static str,
    },
    /// Opening a session channel or sending a request on it failed.
    #[error("ssh session on {address}: {reason}")]
    Session {
        /// `host:port`.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The command exited non-zero.
    #[error("process exited with status {status}")]
    Exit {
        /// Exit status.
        status: u32,
        /// Standard output.
        stdout: Vec<u8>,
        /// Standard error.
        stderr: Vec<u8>,
    },
    /// The command was killed by a signal.
    #[error("process killed by signal {signal}")]
    Signal {
        /// Signal name without the `SIG` prefix, as the server sent it.
        signal: String,
        /// Standard output.
        stdout: Vec<u8>,
        /// Standard error.
        stderr: Vec<u8>,
    },
    /// The channel closed without an exit status or signal.
    #[error("remote command on {address} ended without an exit status")]
    NoExitStatus {
        /// `host:port`.
        address: String,
        /// Standard output.
        stdout: Vec<u8>,
        /// Standard error.
        stderr: Vec<u8>,
    },
}

impl SshError {
    /// The core's classification of this error.
    pub fn kind(&self) -> core_cmd::ExecErrorKind {
        use core_cmd::ExecErrorKind as K;
        match self {
            SshError::NoAddress => K::NoAddress,
            SshError::Connect { .. } => K::Connect,
            SshError::Handshake { .. } | SshError::Auth { .. } => K::Auth,
            SshError::HostKey { .. } => K::HostKey,
            SshError::Timeout { .. } => K::Timeout,
            SshError::Exit { status, .. } => K::Exit(i32::try_from(*status).unwrap_or(i32::MAX)),
            SshError::Signal { signal, .. } => match signal_number(signal) {
                Some(n) => K::Exit(128 + n),
                None => K::Other,
            },
            SshError::BadAddress { .. }
            | SshError::Session { .. }
            | SshError::NoExitStatus { .. } => K::Other,
        }
    }
}

/// The usual Linux number of a signal the server names, for the shell's `128 + n` convention.
fn signal_number(name: &str) -> Option<i32> {
    let n = match name.trim_start_matches("SIG") {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        _ => return None,
    };
    Some(n)
}

impl From<SshError> for core_cmd::ExecError {
    fn from(e: SshError) -> Self {
        let kind = e.kind();
        let message = e.to_string();
        let (stdout, stderr) = match e {
            SshError::Exit { stdout, stderr, .. }
            | SshError::Signal { stdout, stderr, .. }
            | SshError::NoExitStatus { stdout, stderr, .. } => (stdout, stderr),
            _ => (Vec::new(), Vec::new()),
        };
        core_cmd::ExecError {
            kind,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            message,
        }
    }
}

/// What a remote command printed and how it exited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error (extended data type 1).
    pub stderr: Vec<u8>,
    /// Exit status.
    pub exit_status: u32,
}

impl ExecOutput {
    /// Ok if the command exited 0, else [`SshError::Exit`] carrying the output.
    pub fn into_result(self) -> Result<ExecOutput, SshError> {
        if self.exit_status == 0 {
            Ok(self)
        } else {
            Err(SshError::Exit {
                status: self.exit_status,
                stdout: self.stdout,
                stderr: self.stderr,
            })
        }
    }
}

impl From<ExecOutput> for core_cmd::ExecOutput {
    fn from(o: ExecOutput) -> Self {
        core_cmd::ExecOutput {
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Converts an [`Executor::exec`] result into the shape of the core's `Input::ExecFinished`.
pub fn to_core(
    result: Result<ExecOutput, SshError>,
) -> Result<core_cmd::ExecOutput, core_cmd::ExecError> {
    result.map(Into::into).map_err(Into::into)
}

/// A failed private-key load. It never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `file:///path` could not be read.
    #[error("cannot read DispatchPrivateKey file {path}: {reason}")]
    Read {
        /// The path.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// The text is not a private key this executor understands.
    #[error("cannot parse DispatchPrivateKey ({source_name}): {reason}")]
    Parse {
        /// Where the key came from: "literal" or the file path.
        source_name: String,
        /// The parser's error (no key material).
        reason: String,
    },
}

/// Loads `Containers.DispatchPrivateKey` as the config gives it: the PEM or OpenSSH text of an
/// unencrypted private key, or `file:///abs/path` naming a file that holds one.
pub fn load_private_key(value: &str) -> Result<PrivateKey, KeyError> {
    let (text, source_name) = match value.strip_prefix("file://") {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read {
                path: path.to_string(),
                reason: e.to_string(),
            })?;
            (text, path.to_string())
        }
        None => (value.to_string(), "literal".to_string()),
    };
    russh::keys::decode_secret_key(&text, None).map_err(|e| KeyError::Parse {
        source_name,
        reason: e.to_string(),
    })
}

/// A host-key verification failure, as the verifier words it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostKeyError {
    /// The verifier has no way to check keys (Go's `ErrNotImplemented`).
    #[error("host key verification not implemented")]
    NotImplemented,
    /// The key was checked and rejected; the text says why (such as `bad instance secret`).
    #[error("{0}")]
    Rejected(String),
}

/// Decides whether a host key presented by a new connection belongs to the target.
pub trait HostKeyVerifier: Send + Sync {
    /// Verifies `key`. `conn` is the new, still unverified connection; the verifier may run
    /// commands on it (the instance-secret check does).
    fn verify_host_key<'a>(
        &'a self,
        key: &'a PublicKey,
        conn: &'a UnverifiedConnection<'a>,
    ) -> BoxFuture<'a, Result<(), HostKeyError>>;
}

/// Verification through the instance secret (§5.3): run `cat /var/run/arvados-instance-secret`
/// (with a `sudo ` prefix unless the remote user is root) on the new connection; its stdout must
/// equal the secret exactly.
#[derive(Clone)]
pub struct InstanceSecretVerifier {
    secret: String,
}

impl InstanceSecretVerifier {
    /// A verifier expecting `secret` (the `InstanceSecret` tag value).
    pub fn new(secret: impl Into<String>) -> Self {
        InstanceSecretVerifier {
            secret: secret.into(),
        }
    }
}

impl fmt::Debug for InstanceSecretVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceSecretVerifier")
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl HostKeyVerifier for InstanceSecretVerifier {
    fn verify_host_key<'a>(
        &'a self,
        _key: &'a PublicKey,
        conn: &'a UnverifiedConnection<'a>,
    ) -> BoxFuture<'a, Result<(), HostKeyError>> {
        Box::pin(verify_instance_secret(conn, &self.secret))
    }
}

/// Runs the instance-secret check on `conn`: Ok if the remote secret file holds exactly
/// `secret`, else [`HostKeyError::Rejected`] with `bad instance secret` (or the command's error).
pub async fn verify_instance_secret(
    conn: &UnverifiedConnection<'_>,
    secret: &str,
) -> Result<(), HostKeyError> {
    if secret.is_empty() {
        return Err(HostKeyError::NotImplemented);
    }
    let command = if conn.remote_user() == "root" {
        INSTANCE_SECRET_COMMAND.to_string()
    } else {
        format!("sudo {INSTANCE_SECRET_COMMAND}")
    };
    let out = conn
        .run(&command, b"", &[])
        .await
        .and_then(ExecOutput::into_result)
        .map_err(|e| HostKeyError::Rejected(format!("error reading instance secret: {e}")))?;
    if out.stdout == secret.as_bytes() {
        Ok(())
    } else {
        Err(HostKeyError::Rejected(BAD_INSTANCE_SECRET.to_string()))
    }
}

/// Accepts every host key. For tests and for targets that are trusted by construction.
#[derive(Clone, Copy, Debug, Default)]
pub struct AcceptAnyHostKey;

impl HostKeyVerifier for AcceptAnyHostKey {
    fn verify_host_key<'a>(
        &'a self,
        _key: &'a PublicKey,
        _conn: &'a UnverifiedConnection<'a>,
    ) -> BoxFuture<'a, Result<(), HostKeyError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A new connection whose host key is being verified. Commands run on it are bounded by the
/// deadline of the operation that dialled.
pub struct UnverifiedConnection<'a> {
    handle: &'a client::Handle<ClientHandler>,
    address: &'a str,
    remote_user: &'a str,
    deadline: Instant,
}

impl UnverifiedConnection<'_> {
    /// `host:port` of the connection.
    pub fn address(&self) -> &str {
        self.address
    }

    /// The user the connection authenticated as.
    pub fn remote_user(&self) -> &str {
        self.remote_user
    }

    /// Runs one command on a new session of this connection (any exit status is Ok).
    pub async fn run(
        &self,
        command: &str,
        stdin: &[u8],
        env: &[(String, String)],
    ) -> Result<ExecOutput, SshError> {
        session::run(
            self.handle,
            self.address,
            command,
            stdin,
            env,
            self.deadline,
        )
        .await
    }
}

/// Where an executor connects, and how it checks the host.
#[derive(Clone)]
pub struct Target {
    /// `host`, `host:port`, `[v6]:port` or a bare IPv6 address; "" while unknown.
    pub address: String,
    /// The user to log in as.
    pub remote_user: String,
    /// Decides whether a new host key belongs to this target.
    pub verifier: Arc<dyn HostKeyVerifier>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("address", &self.address)
            .field("remote_user", &self.remote_user)
            .finish_non_exhaustive()
    }
}

/// What every executor of a dispatcher shares: the private key and the default port.
#[derive(Clone)]
pub struct ExecutorConfig {
    key: Arc<PrivateKey>,
    default_port: String,
}

impl ExecutorConfig {
    /// A config authenticating with `key`, using `default_port` (`SSHPort`: a number, or "ssh"
    /// or "" for 22) for addresses without a port.
    pub fn new(key: PrivateKey, default_port: impl Into<String>) -> Self {
        ExecutorConfig {
            key: Arc::new(key),
            default_port: default_port.into(),
        }
    }

    /// The public half of the key, for `authorized_keys` (DeployPublicKey).
    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }
}

impl fmt::Debug for ExecutorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecutorConfig")
            .field(
                "key",
                &self
                    .key
                    .public_key()
                    .fingerprint(HashAlg::Sha256)
                    .to_string(),
            )
            .field("default_port", &self.default_port)
            .finish()
    }
}

/// The russh client handler: accepts any host key and records it for verification after the
/// handshake.
pub struct ClientHandler {
    presented: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(cert) => PublicKey::from(cert.public_key().clone()),
        };
        *lock(&self.presented) = Some(key);
        Ok(true)
    }
}

/// One established, verified connection.
struct Connection {
    handle: client::Handle<ClientHandler>,
    address: String,
}

/// The connection slot; its mutex is the dial lock.
#[derive(Default)]
struct Slot {
    conn: Option<Arc<Connection>>,
    /// The error of the last dial that left no connection.
    error: Option<SshError>,
}

struct Inner {
    config: ExecutorConfig,
    target: Mutex<Target>,
    slot: tokio::sync::Mutex<Slot>,
    verified: Mutex<Option<PublicKey>>,
}

/// Runs commands on one worker over one multiplexed SSH connection. Cloning shares it.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl fmt::Debug for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor")
            .field("target", &*lock(&self.inner.target))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How long closing a connection or channel may take in the background.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

impl Executor {
    /// An executor for `target`. Nothing is dialled until the first command.
    pub fn new(config: ExecutorConfig, target: Target) -> Self {
        Executor {
            inner: Arc::new(Inner {
                config,
                target: Mutex::new(target),
                slot: tokio::sync::Mutex::new(Slot::default()),
                verified: Mutex::new(None),
            }),
        }
    }

    /// Swaps the target. It is used at the next dial; the current connection stays in use
    /// until it fails (Go's `SetTarget`).
    pub fn set_target(&self, target: Target) {
        *lock(&self.inner.target) = target;
    }

    /// The host key verified last, if any.
    pub fn verified_host_key(&self) -> Option<PublicKey> {
        lock(&self.inner.verified).clone()
    }

    /// Runs `command` with `stdin` and `env` before `deadline`. Ok only if it exited 0; a
    /// non-zero exit is [`SshError::Exit`] with the output.
    pub async fn exec(
        &self,
        command: &str,
        stdin: &[u8],
        env: &[(String, String)],
        deadline: Instant,
    ) -> Result<ExecOutput, SshError> {
        self.run(command, stdin, env, deadline)
            .await
            .and_then(ExecOutput::into_result)
    }

    /// Runs `command` like [`Executor::exec`] but returns any exit status as Ok.
    pub async fn run(
        &self,
        command: &str,
        stdin: &[u8],
        env: &[(String, String)],
        deadline: Instant,
    ) -> Result<ExecOutput, SshError> {
        let (conn, dialled) = self.connection(false, deadline).await?;
        let channel = match session::open(&conn.handle, &conn.address, deadline).await {
            Ok(ch) => ch,
            Err(e @ SshError::Timeout { .. }) => return Err(e),
            Err(first) => {
                if dialled {
                    return Err(first);
                }
                // The existing connection is broken: dial once more, then give up.
                let (conn, _) = self.connection(true, deadline).await?;
                let ch = session::open(&conn.handle, &conn.address, deadline).await?;
                return session::run_channel(ch, &conn.address, command, stdin, env, deadline)
                    .await;
            }
        };
        session::run_channel(channel, &conn.address, command, stdin, env, deadline).await
    }

    /// Closes the current connection. A later command dials again (Go's `Close` is not
    /// terminal either).
    pub async fn close(&self) {
        let mut slot = self.inner.slot.lock().await;
        if let Some(conn) = slot.conn.take() {
            close_in_background(conn);
        }
        slot.error = Some(SshError::Session {
            address: lock(&self.inner.target).address.clone(),
            reason: "closed".into(),
        });
    }

    /// The current connection, dialling if there is none or `create` is set. Returns whether
    /// this call dialled. A caller that finds a dial in progress waits for it and returns its
    /// outcome without dialling.
    async fn connection(
        &self,
        create: bool,
        deadline: Instant,
    ) -> Result<(Arc<Connection>, bool), SshError> {
        let mut slot = match self.inner.slot.try_lock() {
            Ok(slot) => slot,
            Err(_) => {
                let address = lock(&self.inner.target).address.clone();
                let slot = timeout_at(deadline, self.inner.slot.lock())
                    .await
                    .map_err(|_| SshError::Timeout {
                        address: address.clone(),
                        what: "waiting for a connection",
                    })?;
                return match (&slot.conn, &slot.error) {
                    (Some(conn), _) => Ok((conn.clone(), false)),
                    (None, Some(e)) => Err(e.clone()),
                    (None, None) => Err(SshError::Session {
                        address,
                        reason: "no connection".into(),
                    }),
                };
            }
        };
        if let Some(conn) = &slot.conn
            && !create
        {
            return Ok((conn.clone(), false));
        }
        match self.dial(deadline).await {
            Ok(conn) => {
                let conn = Arc::new(conn);
                if let Some(old) = slot.conn.replace(conn.clone()) {
                    close_in_background(old);
                }
                slot.error = None;
                Ok((conn, true))
            }
            Err(e) => {
                // A failed redial keeps the old connection and its (absent) error, as Go does.
                if slot.conn.is_none() {
                    slot.error = Some(e.clone());
                }
                Err(e)
            }
        }
    }

    async fn dial(&self, deadline: Instant) -> Result<Connection, SshError> {
        let target = lock(&self.inner.target).clone();
        let (host, port) = resolve_address(&target.address, &self.inner.config.default_port)?;
        let address = address::join(&host, port);
        let tcp = match timeout_at(
            deadline,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Err(_) => {
                return Err(SshError::Timeout {
                    address,
                    what: "TCP connect",
                });
            }
            Ok(Err(e)) => {
                return Err(SshError::Connect {
                    address,
                    reason: e.to_string(),
                });
            }
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let presented = Arc::new(Mutex::new(None));
        let handler = ClientHandler {
            presented: presented.clone(),
        };
        let config = Arc::new(client::Config {
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        });
        let mut handle =
            match timeout_at(deadline, client::connect_stream(config, tcp, handler)).await {
                Err(_) => {
                    return Err(SshError::Timeout {
                        address,
                        what: "SSH handshake",
                    });
                }
                Ok(Err(e)) => {
                    return Err(SshError::Handshake {
                        address,
                        reason: e.to_string(),
                    });
                }
                Ok(Ok(h)) => h,
            };
        let key = self.inner.config.key.clone();
        let user = target.remote_user.clone();
        let auth = timeout_at(deadline, async {
            let hash = if key.algorithm().is_rsa() {
                handle.best_supported_rsa_hash().await?.flatten()
            } else {
                None
            };
            handle
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
                .await
        })
        .await;
        let fail = |handle, e: SshError| {
            close_handle_in_background(handle);
            Err(e)
        };
        match auth {
            Err(_) => {
                return fail(
                    handle,
                    SshError::Timeout {
                        address,
                        what: "SSH authentication",
                    },
                );
            }
            Ok(Err(e)) => {
                return fail(
                    handle,
                    SshError::Handshake {
                        address,
                        reason: e.to_string(),
                    },
                );
            }
            Ok(Ok(r)) if !r.success() => {
                return fail(
                    handle,
                    SshError::Auth {
                        address,
                        user: target.remote_user,
                    },
                );
            }
            Ok(Ok(_)) => {}
        }
        let Some(presented) = lock(&presented).take() else {
            return fail(
                handle,
                SshError::Handshake {
                    address,
                    reason: "the server presented no host key".into(),
                },
            );
        };
        let known = lock(&self.inner.verified)
            .as_ref()
            .is_some_and(|k| k.key_data() == presented.key_data());
        if !known {
            let conn = UnverifiedConnection {
                handle: &handle,
                address: &address,
                remote_user: &target.remote_user,
                deadline,
            };
            let verdict =
                timeout_at(deadline, target.verifier.verify_host_key(&presented, &conn)).await;
            match verdict {
                Err(_) => {
                    return fail(
                        handle,
                        SshError::Timeout {
                            address,
                            what: "host key verification",
                        },
                    );
                }
                Ok(Err(e)) => {
                    return fail(
                        handle,
                        SshError::HostKey {
                            address,
                            reason: e.to_string(),
                        },
                    );
                }
                Ok(Ok(())) => {
                    tracing::debug!(
                        address = %address,
                        fingerprint = %presented.fingerprint(HashAlg::Sha256),
                        "host key verified"
                    );
                    *lock(&self.inner.verified) = Some(presented);
                }
            }
        }
        Ok(Connection { handle, address })
    }
}

fn close_in_background(conn: Arc<Connection>) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(
            CLOSE_GRACE,
            conn.handle
                .disconnect(russh::Disconnect::ByApplication, "", "en"),
        )
        .await;
    });
}

fn close_handle_in_background(handle: client::Handle<ClientHandler>) {
    close_in_background(Arc::new(Connection {
        handle,
        address: String::new(),
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::LineEnding;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    fn key_text() -> String {
        PrivateKey::from(Ed25519Keypair::from_seed(&[9; 32]))
            .to_openssh(LineEnding::LF)
            .expect("encode")
            .to_string()
    }

    #[test]
    fn private_key_literal_file_and_errors() {
        let text = key_text();
        let key = load_private_key(&text).expect("literal key");
        let dir = std::env::temp_dir().join(format!("adc-ssh-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("k");
        std::fs::write(&path, &text).expect("write");
        let from_file = load_private_key(&format!("file://{}", path.display())).expect("file key");
        assert_eq!(key.public_key(), from_file.public_key());
        let _ = std::fs::remove_dir_all(&dir);

        let e = load_private_key("file:///nonexistent/adc-key").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/adc-key"), "{e}");
        // A damaged key's error does not repeat the key.
        let damaged = text.replace('A', "*");
        let e = load_private_key(&damaged).unwrap_err().to_string();
        let body: Vec<&str> = damaged
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        for line in body {
            assert!(!e.contains(line), "the error shows key material: {e}");
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let text = key_text();
        let config = ExecutorConfig::new(load_private_key(&text).expect("key"), "22");
        let shown = format!("{config:?}");
        assert!(shown.contains("SHA256:"), "{shown}");
        for line in text.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!shown.contains(line), "{shown}");
        }
        let v = InstanceSecretVerifier::new("s3cr3t-value");
        assert!(!format!("{v:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn errors_map_to_core_kinds() {
        use core_cmd::ExecErrorKind as K;
        let a = || "127.0.0.1:22".to_string();
        let cases = [
            (SshError::NoAddress, K::NoAddress),
            (
                SshError::Connect {
                    address: a(),
                    reason: "refused".into(),
                },
                K::Connect,
            ),
            (
                SshError::Auth {
                    address: a(),
                    user: "root".into(),
                },
                K::Auth,
            ),
            (
                SshError::HostKey {
                    address: a(),
                    reason: BAD_INSTANCE_SECRET.into(),
                },
                K::HostKey,
            ),
            (
                SshError::Timeout {
                    address: a(),
                    what: "remote command",
                },
                K::Timeout,
            ),
            (
                SshError::Signal {
                    signal: "TERM".into(),
                    stdout: vec![],
                    stderr: vec![],
                },
                K::Exit(143),
            ),
        ];
        for (e, kind) in cases {
            let core: core_cmd::ExecError = e.clone().into();
            assert_eq!(core.kind, kind, "{e:?}");
            assert_eq!(core.message, e.to_string());
        }
        let core: core_cmd::ExecError = SshError::Exit {
            status: 2,
            stdout: b"out".to_vec(),
            stderr: b"err".to_vec(),
        }
        .into();
        assert_eq!(core.kind, K::Exit(2));
        assert_eq!((core.stdout.as_str(), core.stderr.as_str()), ("out", "err"));
        assert_eq!(core.message, "process exited with status 2");
    }
}
