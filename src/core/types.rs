//! Domain types shared by the scheduler, the queue and the worker pool.
//!
//! Field names and JSON shapes follow the Arvados API where these values cross the wire
//! (containers, instance types, instance views); see reference-scheduler.md §1.5 and §6.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::key::Key;
use super::time::Timestamp;

/// GPU properties of an instance type (`InstanceTypes.<name>.GPU`). VRAM is per GPU.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GpuSpec {
    /// "", "cuda" or "rocm".
    pub stack: String,
    /// Driver version, compared as a float (reference-scheduler.md §5.5).
    pub driver_version: String,
    /// CUDA capability ("9.0") or ROCm target ("gfx1100").
    pub hardware_target: String,
    /// Number of GPUs.
    pub device_count: i64,
    /// VRAM per GPU, bytes.
    #[serde(rename = "VRAM")]
    pub vram: i64,
}

/// A configured instance type. Serialised as Arvados does: no `Name`, no `Scratch`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceType {
    /// The config map key.
    #[serde(skip)]
    pub name: String,
    /// The cloud's type ID (defaults to the name).
    #[serde(rename = "ProviderType")]
    pub provider_type: String,
    /// Virtual CPUs.
    #[serde(rename = "VCPUs")]
    pub vcpus: i64,
    /// RAM, bytes.
    #[serde(rename = "RAM")]
    pub ram: i64,
    /// Disk that comes with the type, bytes.
    #[serde(rename = "IncludedScratch")]
    pub included_scratch: i64,
    /// Extra disk the driver attaches, bytes.
    #[serde(rename = "AddedScratch")]
    pub added_scratch: i64,
    /// IncludedScratch + AddedScratch.
    #[serde(skip)]
    pub scratch: i64,
    /// Hourly price in dollars.
    #[serde(rename = "Price")]
    pub price: f64,
    /// A spot/preemptible type.
    #[serde(rename = "Preemptible")]
    pub preemptible: bool,
    /// GPU properties.
    #[serde(rename = "GPU")]
    pub gpu: GpuSpec,
    /// The driver's instance quota group (reference-workers.md §6.2), used as a capacity key.
    #[serde(skip)]
    pub quota_group: String,
}

impl InstanceType {
    /// The key the pool uses for type-specific capacity errors: ProviderType, with
    /// `-preemptible` appended for a preemptible type.
    pub fn capacity_key(&self) -> String {
        if self.preemptible {
            format!("{}-preemptible", self.provider_type)
        } else {
            self.provider_type.clone()
        }
    }

    /// The scheduler's per-pass at-capacity key: `"<ProviderType>, preemptible=<bool>"`.
    pub fn pass_capacity_key(&self) -> String {
        format!("{}, preemptible={}", self.provider_type, self.preemptible)
    }

    /// The resources of an empty instance of this type.
    pub fn capacity(&self) -> Resources {
        Resources {
            vcpus: self.vcpus,
            ram: self.ram,
            scratch: self.scratch,
            gpus: self.gpu.device_count,
            gpu_vram: self.gpu.vram,
            shared_vcpu_used: false,
        }
    }
}

/// Resources a container needs, or an instance has left (`InstanceResources` in Go).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Resources {
    /// Virtual CPUs.
    #[serde(rename = "VCPUs")]
    pub vcpus: i64,
    /// RAM, bytes.
    #[serde(rename = "RAM")]
    pub ram: i64,
    /// Scratch disk, bytes.
    #[serde(rename = "Scratch")]
    pub scratch: i64,
    /// GPUs.
    #[serde(rename = "GPUs")]
    pub gpus: i64,
    /// VRAM per GPU, bytes.
    #[serde(rename = "GPUVRAM")]
    pub gpu_vram: i64,
    /// Set once a 0-VCPU container has taken the shared VCPU of an instance.
    #[serde(skip)]
    pub shared_vcpu_used: bool,
}

impl Resources {
    /// All zeros: an instance treated as full.
    pub const FULL: Resources = Resources {
        vcpus: 0,
        ram: 0,
        scratch: 0,
        gpus: 0,
        gpu_vram: 0,
        shared_vcpu_used: false,
    };

    /// Whether `self` (remaining capacity) can hold `need` (reference-scheduler.md §1.5).
    pub fn accommodates(&self, need: &Resources) -> bool {
        self.vcpus >= need.vcpus
            && self.ram >= need.ram
            && self.scratch >= need.scratch
            && self.gpus >= need.gpus
            && self.gpu_vram >= need.gpu_vram
            && self.vcpus > 0
            && (!self.shared_vcpu_used || self.vcpus > need.vcpus)
    }

    /// Take `need` out of `self`. A 0-VCPU container marks the shared VCPU as used.
    pub fn sub(&mut self, need: &Resources) {
        self.vcpus -= need.vcpus;
        self.ram -= need.ram;
        self.scratch -= need.scratch;
        self.gpus -= need.gpus;
        self.gpu_vram -= need.gpu_vram;
        if need.vcpus == 0 {
            self.shared_vcpu_used = true;
        }
    }
}

/// Container states as the controller reports them.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum ContainerState {
    /// Waiting for a dispatcher.
    #[default]
    Queued,
    /// Locked by a dispatcher.
    Locked,
    /// crunch-run has started it.
    Running,
    /// Finished.
    Complete,
    /// Cancelled.
    Cancelled,
}

impl ContainerState {
    /// The Arvados spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerState::Queued => "Queued",
            ContainerState::Locked => "Locked",
            ContainerState::Running => "Running",
            ContainerState::Complete => "Complete",
            ContainerState::Cancelled => "Cancelled",
        }
    }

    /// Complete or Cancelled.
    pub fn is_final(self) -> bool {
        matches!(self, ContainerState::Complete | ContainerState::Cancelled)
    }
}

impl fmt::Display for ContainerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `runtime_constraints.gpu`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuRequest {
    /// "", "cuda" or "rocm".
    pub stack: String,
    /// Number of GPUs.
    pub device_count: i64,
    /// Minimum driver version.
    pub driver_version: String,
    /// Acceptable hardware targets.
    pub hardware_target: Vec<String>,
    /// VRAM per GPU, bytes.
    pub vram: i64,
}

/// `runtime_constraints`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeConstraints {
    /// Virtual CPUs.
    pub vcpus: i64,
    /// RAM, bytes.
    pub ram: i64,
    /// Keep cache in RAM, bytes.
    pub keep_cache_ram: i64,
    /// Keep cache on disk, bytes.
    pub keep_cache_disk: i64,
    /// GPU request.
    pub gpu: GpuRequest,
    /// Whether the container needs API access (not used for scheduling).
    #[serde(rename = "API")]
    pub api: bool,
}

/// `scheduling_parameters`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulingParameters {
    /// Must equal the type's Preemptible flag.
    pub preemptible: bool,
    /// A workflow supervisor, counted against SupervisorFraction.
    pub supervisor: bool,
    /// SLURM partitions (ignored).
    pub partitions: Vec<String>,
    /// Enforced by crunch-run (ignored here).
    pub max_run_time: i64,
}

/// One entry of a container's `mounts`: only what scratch estimation reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Mount {
    /// Mount kind; "tmp" mounts count towards scratch.
    pub kind: String,
    /// Capacity in bytes.
    pub capacity: i64,
}

/// The partial container record the dispatcher works with (reference-scheduler.md §1.5).
///
/// `repr(C)` keeps the fields in this order, so that what a poll reads of every record (the
/// UUID, the state, the priority) sits in the first 48 bytes, next to an `Arc`'s reference
/// counts: a poll then loads one cache line per record where it loaded two or three.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[repr(C)]
pub struct Container {
    /// The container UUID.
    pub uuid: Key,
    /// State.
    pub state: ContainerState,
    /// Priority (large int64, derived from the requests).
    pub priority: i64,
    /// Resource constraints.
    pub runtime_constraints: RuntimeConstraints,
    /// Image PDH `<md5>+<size>`.
    pub container_image: String,
    /// Scheduling parameters.
    pub scheduling_parameters: SchedulingParameters,
    /// Creation time, milliseconds.
    pub created_at: Timestamp,
    /// Token UUID of the lock holder, once a lock/unlock response has been seen.
    pub locked_by_uuid: Option<String>,
    /// Mounts: fetched once, at first sight, then dropped.
    pub mounts: Option<BTreeMap<String, Mount>>,
}

/// Worker states (reference-workers.md §1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Not created by this process and no probe has succeeded yet.
    Unknown,
    /// Created by this process, not yet ready.
    Booting,
    /// Ready, no containers.
    Idle,
    /// Ready, at least one container.
    Running,
    /// Destroy requested.
    Shutdown,
}

impl WorkerState {
    /// The Arvados spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Unknown => "unknown",
            WorkerState::Booting => "booting",
            WorkerState::Idle => "idle",
            WorkerState::Running => "running",
            WorkerState::Shutdown => "shutdown",
        }
    }

    /// All states, in a fixed order (for metrics and counts).
    pub const ALL: [WorkerState; 5] = [
        WorkerState::Unknown,
        WorkerState::Booting,
        WorkerState::Idle,
        WorkerState::Running,
        WorkerState::Shutdown,
    ];
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Admin intent for a worker (reference-workers.md §1.2), stored in the `IdleBehavior` tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleBehavior {
    /// Accept containers; shut down after TimeoutIdle.
    Run,
    /// No new containers, never shut down automatically.
    Hold,
    /// No new containers, shut down when idle.
    Drain,
}

impl IdleBehavior {
    /// The Arvados spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IdleBehavior::Run => "run",
            IdleBehavior::Hold => "hold",
            IdleBehavior::Drain => "drain",
        }
    }

    /// Parses a tag value; `None` for anything other than run, hold or drain.
    pub fn parse(s: &str) -> Option<IdleBehavior> {
        match s {
            "run" => Some(IdleBehavior::Run),
            "hold" => Some(IdleBehavior::Hold),
            "drain" => Some(IdleBehavior::Drain),
            _ => None,
        }
    }
}

impl fmt::Display for IdleBehavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the pool's instance list (reference-scheduler.md §1.5, §6 InstanceView).
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceView {
    /// Cloud ID; "" for a create still in flight.
    pub instance: String,
    /// Address ("" while unknown).
    pub address: String,
    /// Configured hourly price.
    pub price: f64,
    /// Configured type name.
    pub arvados_instance_type: String,
    /// Cloud type.
    pub provider_instance_type: String,
    /// UUID most recently started (or first seen) on it.
    pub last_container_uuid: String,
    /// Last time it was busy.
    pub last_busy: Timestamp,
    /// Containers running or starting, sorted. `None` for a pending create.
    pub running_container_uuids: Option<Vec<String>>,
    /// State.
    pub worker_state: WorkerState,
    /// Idle behaviour.
    pub idle_behavior: IdleBehavior,
}

/// One point of a price history: the hourly price in effect from `start_time` on (Go's
/// `cloud.InstancePrice`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PricePoint {
    /// When the price took effect, in milliseconds since the Unix epoch.
    pub start_time: Timestamp,
    /// Dollars per hour.
    pub price: f64,
}

/// A cloud instance as a driver lists it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Stable cloud ID.
    pub id: String,
    /// `host` or `host:port`; "" while unknown.
    pub address: String,
    /// The cloud's type.
    pub provider_type: String,
    /// Tags as listed (may be stale after a SetTags).
    pub tags: BTreeMap<String, String>,
    /// SSH user.
    pub remote_user: String,
    /// The price history of the instance's market (EC2: its provider type, spot, and
    /// availability zone), newest first and normalised
    /// ([`normalize_price_history`](super::price::normalize_price_history)). Empty for
    /// on-demand instances and for drivers that report no prices. The added scratch volume is
    /// not included: the run probe adds it (see `scratch_gib_month_price`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub price_history: Vec<PricePoint>,
    /// Dollars per GiB-month of the added scratch volume (EC2's `EBSPrice`). The run probe adds
    /// `scratch_gib_month_price` × ceil(AddedScratch / GiB) / 30 / 24 to every price of
    /// `price_history`, as Go's `PriceHistory(instanceType)` does.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub scratch_gib_month_price: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}
