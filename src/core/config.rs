//! The validated configuration the core runs on.
//!
//! These are plain values: durations are parsed, byte sizes are integers, instance types are
//! complete (ProviderType filled in, Scratch computed, preemptible variants added). The YAML
//! loader in `crate::config` produces this; the simulator builds it from scenario files. Secrets
//! (tokens, keys, cloud credentials) never enter the core, so nothing here can leak one.

use std::collections::BTreeMap;
use std::time::Duration;

use super::types::InstanceType;

/// Everything the core needs to know about the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `ClusterID`: the UUID prefix. crunch-run lines of other clusters are ignored.
    pub cluster_id: String,
    /// Configured instance types keyed by name (the preemptible variants included).
    pub instance_types: BTreeMap<String, InstanceType>,
    /// `Containers.*` keys the core uses.
    pub containers: ContainersConfig,
    /// `Containers.CloudVMs.*` keys the core uses.
    pub cloud_vms: CloudVmsConfig,
    /// Knobs of this implementation that have no Arvados key (see docs/compatibility.md).
    pub tuning: Tuning,
}

/// `Clusters.<id>.Containers.*`.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainersConfig {
    /// `MaxDispatchAttempts`: enforced by the controller on unlock, informational here.
    pub max_dispatch_attempts: i64,
    /// `StaleLockTimeout`.
    pub stale_lock_timeout: Duration,
    /// `ReserveExtraRAM` in bytes.
    pub reserve_extra_ram: i64,
    /// `LocalKeepBlobBuffersPerVCPU`.
    pub local_keep_blob_buffers_per_vcpu: i64,
    /// `MaximumPriceFactor`.
    pub maximum_price_factor: f64,
    /// `PreemptiblePriceFactor` (already applied to `Config::instance_types`).
    pub preemptible_price_factor: f64,
    /// `CrunchRunCommand`.
    pub crunch_run_command: String,
    /// `CrunchRunArgumentsList`.
    pub crunch_run_arguments_list: Vec<String>,
    /// `RuntimeEngine`.
    pub runtime_engine: String,
}

/// `Clusters.<id>.Containers.CloudVMs.*`. Zero durations have already been replaced by the code
/// fallbacks of reference-workers.md §0.3.
#[derive(Clone, Debug, PartialEq)]
pub struct CloudVmsConfig {
    /// `Driver`: ec2, azure or loopback.
    pub driver: String,
    /// `PollInterval`: minimum time between queue polls (0 means back to back).
    pub poll_interval: Duration,
    /// `MaxInstances` (0 = unlimited).
    pub max_instances: usize,
    /// `InitialQuotaEstimate` (0 = use MaxInstances).
    pub initial_quota_estimate: usize,
    /// `SupervisorFraction`.
    pub supervisor_fraction: f64,
    /// `MaxRunningContainersPerInstance` (0 = unlimited).
    pub max_running_containers_per_instance: usize,
    /// `MaxCloudOpsPerSecond` (0 = unlimited).
    pub max_cloud_ops_per_second: f64,
    /// `MaxConcurrentInstanceCreateOps` (0 = unlimited).
    pub max_concurrent_instance_create_ops: usize,
    /// `SyncInterval`.
    pub sync_interval: Duration,
    /// `ProbeInterval`.
    pub probe_interval: Duration,
    /// `MaxProbesPerSecond`.
    pub max_probes_per_second: f64,
    /// `BootProbeCommand` (`true` when empty).
    pub boot_probe_command: String,
    /// `TimeoutIdle`.
    pub timeout_idle: Duration,
    /// `TimeoutBooting`.
    pub timeout_booting: Duration,
    /// `TimeoutProbe`.
    pub timeout_probe: Duration,
    /// `TimeoutShutdown`.
    pub timeout_shutdown: Duration,
    /// `TimeoutSignal`.
    pub timeout_signal: Duration,
    /// `TimeoutTERM`.
    pub timeout_term: Duration,
    /// `TimeoutStaleRunLock`.
    pub timeout_stale_run_lock: Duration,
    /// `SSHPort`.
    pub ssh_port: String,
    /// `ImageID`.
    pub image_id: String,
    /// `InstanceInitCommand`.
    pub instance_init_command: String,
    /// `DeployRunnerBinary` ("" = do not deploy).
    pub deploy_runner_binary: String,
    /// `DeployRunnerDirectory`.
    pub deploy_runner_directory: String,
    /// `DeployPublicKey`.
    pub deploy_public_key: bool,
    /// `ResourceTags`.
    pub resource_tags: BTreeMap<String, String>,
    /// `TagKeyPrefix`.
    pub tag_key_prefix: String,
}

/// Limits and deadlines that Arvados hard-codes or does not have. Each is documented in
/// docs/compatibility.md.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuning {
    /// Deadline for a controller API call (poll, lock, unlock, cancel).
    pub api_call_timeout: Duration,
    /// Deadline for a cloud call (create, destroy, list, set tags).
    pub cloud_call_timeout: Duration,
    /// Deadline for one remote command over SSH (Go has none: bug §9.2.1).
    pub exec_timeout: Duration,
    /// Deadline for copying the runner binary to a worker.
    pub deploy_timeout: Duration,
    /// Shortest time between two scheduling passes (Go runs one per notification).
    pub schedule_min_interval: Duration,
    /// Most queue entries kept; further new containers wait for a later poll.
    pub queue_entries_max: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            api_call_timeout: Duration::from_secs(60),
            cloud_call_timeout: Duration::from_secs(120),
            exec_timeout: Duration::from_secs(60),
            deploy_timeout: Duration::from_secs(300),
            schedule_min_interval: Duration::from_millis(100),
            queue_entries_max: 1_000_000,
        }
    }
}

impl Default for ContainersConfig {
    fn default() -> Self {
        ContainersConfig {
            max_dispatch_attempts: 10,
            stale_lock_timeout: Duration::from_secs(60),
            reserve_extra_ram: 550 << 20,
            local_keep_blob_buffers_per_vcpu: 1,
            maximum_price_factor: 1.5,
            preemptible_price_factor: 0.0,
            crunch_run_command: "crunch-run".into(),
            crunch_run_arguments_list: Vec::new(),
            runtime_engine: "docker".into(),
        }
    }
}

impl Default for CloudVmsConfig {
    fn default() -> Self {
        CloudVmsConfig {
            driver: "ec2".into(),
            poll_interval: Duration::from_secs(10),
            max_instances: 64,
            initial_quota_estimate: 0,
            supervisor_fraction: 0.5,
            max_running_containers_per_instance: 0,
            max_cloud_ops_per_second: 10.0,
            max_concurrent_instance_create_ops: 1,
            sync_interval: Duration::from_secs(60),
            probe_interval: Duration::from_secs(10),
            max_probes_per_second: 10.0,
            boot_probe_command: "systemctl is-system-running".into(),
            timeout_idle: Duration::from_secs(60),
            timeout_booting: Duration::from_secs(600),
            timeout_probe: Duration::from_secs(600),
            timeout_shutdown: Duration::from_secs(10),
            timeout_signal: Duration::from_secs(5),
            timeout_term: Duration::from_secs(120),
            timeout_stale_run_lock: Duration::from_secs(5),
            ssh_port: "22".into(),
            image_id: String::new(),
            instance_init_command: String::new(),
            deploy_runner_binary: "/proc/self/exe".into(),
            deploy_runner_directory: "/tmp/arvados-crunch-run".into(),
            deploy_public_key: true,
            resource_tags: BTreeMap::new(),
            tag_key_prefix: "Arvados".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster_id: "zzzzz".into(),
            instance_types: BTreeMap::new(),
            containers: ContainersConfig::default(),
            cloud_vms: CloudVmsConfig::default(),
            tuning: Tuning::default(),
        }
    }
}

impl Config {
    /// The instance types sorted by price, then name: the order `check-config` prints.
    pub fn types_by_price(&self) -> Vec<&InstanceType> {
        let mut v: Vec<&InstanceType> = self.instance_types.values().collect();
        // Name is unique, so the order is total.
        v.sort_by(|a, b| {
            a.price
                .total_cmp(&b.price)
                .then_with(|| a.name.cmp(&b.name))
        });
        v
    }
}
