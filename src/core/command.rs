//! The core's vocabulary with the outside world: commands out, inputs in.
//!
//! Commands are intents in the imperative (`Lock`, `Create`, `Exec`); inputs are facts in the
//! past tense (`LockFinished`, `CreateFinished`). Every command carries an [`OpId`] the core
//! assigned and a deadline; the core accepts exactly one completion per `OpId`. A completion
//! that arrives after the core gave up on the operation, or for an id it never issued, is
//! logged and ignored. Adapters classify provider errors into the closed kinds below, so the
//! core never parses a provider's strings.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::key::Key;
use super::time::Timestamp;
use super::types::{Container, ContainerState, InstanceInfo, InstanceType};

/// Identifies one command and its completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u64);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op{}", self.0)
    }
}

/// One command for an adapter to carry out before `deadline`.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    /// The id its completion must carry.
    pub op: OpId,
    /// When the adapter must give up and report a timeout.
    pub deadline: Timestamp,
    /// What to do.
    pub kind: CommandKind,
}

/// What a command asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum CommandKind {
    /// Poll the controller (reference-scheduler.md §4.2): "mine" and "avail" lists, then
    /// re-fetch `missing` (tracked entries to look up by UUID, in batches of 20), and fetch
    /// `mounts` for every returned container whose UUID is not in `known`.
    PollQueue {
        /// The queue's containers in UUID order: their UUIDs are the known ones (whose
        /// mounts are not needed), and the unfinished ones ([`poll_missing`]) are re-fetched
        /// if the lists do not return them.
        tracked: Vec<Tracked>,
    },
    /// `POST arvados/v1/containers/<uuid>/lock`.
    Lock {
        /// Container.
        uuid: String,
    },
    /// `POST arvados/v1/containers/<uuid>/unlock`.
    Unlock {
        /// Container.
        uuid: String,
    },
    /// `PUT arvados/v1/containers/<uuid>` with `{"state":"Cancelled"}`.
    Cancel {
        /// Container.
        uuid: String,
    },
    /// Cancel a container no instance type fits (§4.4): lock first if `lock_first`, set
    /// `runtime_status.error` to `message`, then cancel.
    CancelUnsatisfiable {
        /// Container.
        uuid: String,
        /// The container is Queued and must be locked first.
        lock_first: bool,
        /// The runtime_status error text.
        message: String,
    },
    /// Create an instance.
    Create {
        /// Configured type.
        instance_type: Arc<InstanceType>,
        /// `CloudVMs.ImageID`.
        image_id: String,
        /// All tags: ResourceTags merged under the four reserved ones.
        tags: BTreeMap<String, String>,
        /// The init command (instance secret writer, then InstanceInitCommand).
        init_command: String,
        /// Install the dispatcher's public key (`DeployPublicKey`).
        install_public_key: bool,
    },
    /// Destroy an instance.
    Destroy {
        /// Cloud ID.
        instance: String,
    },
    /// List the instances carrying these tags.
    ListInstances {
        /// Tag filter (the InstanceSetID tag).
        tags: BTreeMap<String, String>,
    },
    /// Replace an instance's tags.
    SetTags {
        /// Cloud ID.
        instance: String,
        /// The full tag map.
        tags: BTreeMap<String, String>,
    },
    /// Run one remote command over the worker's SSH connection.
    Exec {
        /// Cloud ID.
        instance: String,
        /// Why (the sim and the logs use it; the adapter only runs `command`).
        purpose: ExecPurpose,
        /// The exact remote command line.
        command: String,
        /// What to send on stdin.
        stdin: ExecStdin,
    },
}

/// A container the queue tracks, as a poll reads it: its UUID and its state. Copied from the
/// queue's entries (the keys and the entries' copies of the state), so that starting a poll
/// reads none of the records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracked {
    /// Container UUID.
    pub uuid: Key,
    /// Its state, as the queue has it.
    pub state: ContainerState,
}

/// The UUIDs a poll re-fetches if the lists do not return them: the tracked containers that
/// are not finished, in the order of `tracked`.
pub fn poll_missing(tracked: &[Tracked]) -> impl Iterator<Item = &str> {
    tracked
        .iter()
        .filter(|c| !c.state.is_final())
        .map(|c| c.uuid.as_str())
}

/// Why a remote command runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecPurpose {
    /// `BootProbeCommand`.
    BootProbe,
    /// `md5sum <runner>`.
    RunnerMd5,
    /// Copy the runner binary.
    RunnerInstall,
    /// `crunch-run --list`.
    ListProbe,
    /// `crunch-run --detach ...`.
    StartRunner {
        /// Container.
        uuid: String,
    },
    /// `crunch-run --kill 15 <uuid>`.
    KillRunner {
        /// Container.
        uuid: String,
    },
}

/// Standard input of a remote command.
#[derive(Clone, Debug, PartialEq)]
pub enum ExecStdin {
    /// Nothing.
    Empty,
    /// The runner binary the adapter loaded (`DeployRunnerBinary`).
    RunnerBinary,
    /// crunch-run's ConfigData JSON for this container on this type (reference-workers.md
    /// §2.5). The adapter renders it, because it holds the tokens.
    ConfigData {
        /// Container.
        uuid: String,
        /// The instance's configured type.
        instance_type: Arc<InstanceType>,
        /// The worker's address (for `GatewayAddress`).
        address: String,
    },
    /// Bytes the core rendered: the run probe's `--stdin-prices` JSON array
    /// ([`crate::core::price::prices_json`]).
    Text(String),
}

/// A controller API failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status, when there was a response.
    pub status: Option<u16>,
    /// What went wrong (never containing a token).
    pub message: String,
}

impl ApiError {
    /// The server answered 503 (it counts towards the dynamic concurrency limit).
    pub fn is_503(&self) -> bool {
        self.status == Some(503)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "HTTP {s}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The scope of a capacity error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapacityScope {
    /// Every type.
    Global,
    /// The type's instance quota group.
    QuotaGroup,
    /// This type only.
    InstanceType,
}

/// Closed classification of a cloud error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloudErrorKind {
    /// Account quota reached.
    Quota,
    /// No capacity for the type, its group, or anything.
    Capacity(CapacityScope),
    /// Throttled; retry no earlier than this.
    RateLimited {
        /// Earliest retry time.
        retry_at: Timestamp,
    },
    /// The instance does not exist.
    NotFound,
    /// Might work if retried.
    Transient,
    /// Will not work if retried.
    Permanent,
}

/// A cloud call failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudError {
    /// Classification.
    pub kind: CloudErrorKind,
    /// Provider message (never containing a credential).
    pub message: String,
}

impl fmt::Display for CloudError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Why a remote command failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecErrorKind {
    /// The instance has no address yet.
    NoAddress,
    /// TCP connect failed.
    Connect,
    /// SSH handshake or authentication failed.
    Auth,
    /// The host key could not be verified.
    HostKey,
    /// The deadline passed.
    Timeout,
    /// The command exited non-zero.
    Exit(i32),
    /// Anything else.
    Other,
}

/// A failed remote command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecError {
    /// Classification.
    pub kind: ExecErrorKind,
    /// What was printed before the failure.
    pub stdout: String,
    /// Error output.
    pub stderr: String,
    /// Description.
    pub message: String,
}

/// A remote command that exited 0.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// The fields of a container a lock/unlock/cancel response carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerUpdate {
    /// New state.
    pub state: ContainerState,
    /// Priority.
    pub priority: i64,
    /// Lock holder.
    pub locked_by_uuid: Option<String>,
}

/// What one queue poll returned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PollResult {
    /// Every record the lists and the missing re-fetch returned. New ones carry `mounts`.
    /// Records are shared (`Arc`): the queue keeps the one it is given, and an adapter that
    /// answers with the very record it gave last time (the simulator does) lets the queue skip
    /// it without comparing fields.
    pub containers: Vec<Arc<Container>>,
    /// Missing UUIDs the controller no longer has (an empty batch result).
    pub deleted: Vec<String>,
    /// New containers whose mounts could not be fetched: (uuid, error text).
    pub mounts_errors: Vec<(String, String)>,
    /// The adapter vouches that `containers` is in strictly increasing UUID order (so no
    /// UUID comes twice): the queue then neither sorts them nor looks for duplicates, which
    /// would read every record. Debug builds check. `false` promises nothing.
    pub in_uuid_order: bool,
}

/// Facts the core is told.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A queue poll finished.
    QueuePolled {
        /// Its command.
        op: OpId,
        /// Result.
        result: Result<PollResult, ApiError>,
    },
    /// A lock, unlock or cancel call finished.
    ContainerUpdated {
        /// Its command.
        op: OpId,
        /// Result.
        result: Result<ContainerUpdate, ApiError>,
    },
    /// A cancel-as-unsatisfiable sequence finished.
    UnsatisfiableCancelled {
        /// Its command.
        op: OpId,
        /// Result.
        result: Result<(), ApiError>,
    },
    /// A create call finished.
    CreateFinished {
        /// Its command.
        op: OpId,
        /// Result.
        result: Result<InstanceInfo, CloudError>,
    },
    /// A destroy call finished.
    DestroyFinished {
        /// Its command.
        op: OpId,
        /// Result.
        result: Result<(), CloudError>,
    },
    /// A list call finished.
    InstancesListed {
        /// Its command.
        op: OpId,
        /// Result. Shared records: a driver that keeps its instances' records (the simulated
        /// cloud) lists them without copying, and the pool skips a record it already holds.
        result: Result<Vec<Arc<InstanceInfo>>, CloudError>,
    },
    /// A set-tags call finished.
    TagsSet {
        /// Its command.
        op: OpId,
        /// Result.
        result: Result<(), CloudError>,
    },
    /// A remote command finished.
    ExecFinished {
        /// Its command.
        op: OpId,
        /// Result.
        result: Result<ExecOutput, ExecError>,
    },
    /// The SSH layer reached host-key verification on this instance for the first time
    /// (for `instances_time_to_ssh_seconds`). Not a completion.
    SshConnected {
        /// Cloud ID.
        instance: String,
    },
}

impl Input {
    /// The operation this input completes, if it is a completion.
    pub fn op(&self) -> Option<OpId> {
        match self {
            Input::QueuePolled { op, .. }
            | Input::ContainerUpdated { op, .. }
            | Input::UnsatisfiableCancelled { op, .. }
            | Input::CreateFinished { op, .. }
            | Input::DestroyFinished { op, .. }
            | Input::InstancesListed { op, .. }
            | Input::TagsSet { op, .. }
            | Input::ExecFinished { op, .. } => Some(*op),
            Input::SshConnected { .. } => None,
        }
    }
}
