//! Reading the one cluster of an Arvados config into a [`Loaded`].
//!
//! Both layouts are read: the current one (`Containers.CloudVMs`, `Containers.DispatchPrivateKey`,
//! `Services.DispatchCloud.InternalURLs`) and the legacy one of the old install guide
//! (`CloudVMs` and `Dispatch` at cluster level, `NodeProfiles.*.arvados-dispatch-cloud.Listen`).
//! A legacy key works and adds one deprecation warning naming both paths; where both layouts set
//! the same thing the current one wins, and the warning says so.
//!
//! Defaults are those of Arvados' config.default.yml; for the pool's durations and probe rate a
//! value of 0 (or less) means the code fallback, which equals the default (reference-workers.md
//! §0.3). Keys of the dispatcher's sections that are not known produce a warning with their full
//! path; the sections of other services are accepted silently.
//!
//! Invariant: secret values (tokens, the private key, DriverParameters) are copied into
//! [`Secrets`] or `driver_parameters` and never formatted into a warning or an error.

use std::collections::BTreeMap;
use std::time::Duration;

use md5::{Digest, Md5};
use serde_yaml::Value;

use super::host;
use super::quota_group::{ec2_quota_group, shipped_ec2_quota_groups};
use super::tree::{Entry, Keys, Section, join, key_text, kind, mapping_entries, untag};
use super::units::format_bytes;
use super::{ConfigError, Loaded, Secrets};
use crate::core::config::{CloudVmsConfig, Config, ContainersConfig, Tuning};
use crate::core::types::{GpuSpec, InstanceType};

/// Keys at the top of the file.
const TOP_KEYS: &[&str] = &[
    "Clusters",
    "AutoReloadConfig",
    "SourceTimestamp",
    "SourceSHA256",
];

/// Keys of `Clusters.<id>`: the dispatcher's, the legacy ones, and those of other services.
const CLUSTER_KEYS: &[&str] = &[
    "ClusterID",
    "SystemRootToken",
    "ManagementToken",
    "Services",
    "Containers",
    "InstanceTypes",
    "TLS",
    // The legacy layout.
    "CloudVMs",
    "Dispatch",
    "NodeProfiles",
    "RequestLimits",
    // Other services.
    "API",
    "AuditLogs",
    "Collections",
    "Git",
    "Login",
    "Mail",
    "PostgreSQL",
    "RemoteClusters",
    "StorageClasses",
    "SystemLogs",
    "Users",
    "Volumes",
    "Workbench",
];

/// Keys of `Containers`: the dispatcher's, then those of other services.
const CONTAINERS_KEYS: &[&str] = &[
    "CloudVMs",
    "DispatchPrivateKey",
    "MaxDispatchAttempts",
    "StaleLockTimeout",
    "ReserveExtraRAM",
    "LocalKeepBlobBuffersPerVCPU",
    "MaximumPriceFactor",
    "PreemptiblePriceFactor",
    "CrunchRunCommand",
    "CrunchRunArgumentsList",
    "RuntimeEngine",
    "MaxComputeVMs",
    // Not used by the dispatcher.
    "AlwaysUsePreemptibleInstances",
    "UsePreemptibleInstances",
    "DefaultKeepCacheRAM",
    "LogReuseDecisions",
    "MaxRetryAttempts",
    "MinRetryPeriod",
    "SupportedDockerImageFormats",
    "LocalKeepLogsToContainerLog",
    "Logging",
    "ShellAccess",
    "SLURM",
    "LSF",
    "JobsAPI",
];

/// Keys of `Containers.CloudVMs` (and of the legacy cluster-level `CloudVMs`).
const CLOUDVMS_KEYS: &[&str] = &[
    "Enable",
    "Driver",
    "DriverParameters",
    "PollInterval",
    "MaxInstances",
    "InitialQuotaEstimate",
    "SupervisorFraction",
    "MaxRunningContainersPerInstance",
    "MaxCloudOpsPerSecond",
    "MaxConcurrentInstanceCreateOps",
    "SyncInterval",
    "ProbeInterval",
    "MaxProbesPerSecond",
    "BootProbeCommand",
    "TimeoutIdle",
    "TimeoutBooting",
    "TimeoutProbe",
    "TimeoutShutdown",
    "TimeoutSignal",
    "TimeoutTERM",
    "TimeoutStaleRunLock",
    "SSHPort",
    "ImageID",
    "InstanceInitCommand",
    "DeployRunnerBinary",
    "DeployRunnerDirectory",
    "DeployPublicKey",
    "ResourceTags",
    "TagKeyPrefix",
];

/// Where each key of the legacy `Dispatch` section moved: (old key, moved into CloudVMs rather
/// than Containers, new key).
const DISPATCH_MOVES: &[(&str, bool, &str)] = &[
    ("PrivateKey", false, "DispatchPrivateKey"),
    ("StaleLockTimeout", false, "StaleLockTimeout"),
    ("PollInterval", true, "PollInterval"),
    ("ProbeInterval", true, "ProbeInterval"),
    ("MaxProbesPerSecond", true, "MaxProbesPerSecond"),
    ("TimeoutSignal", true, "TimeoutSignal"),
    ("TimeoutTERM", true, "TimeoutTERM"),
];

/// Keys of the legacy `Dispatch` section.
const DISPATCH_KEYS: &[&str] = &[
    "PrivateKey",
    "StaleLockTimeout",
    "PollInterval",
    "ProbeInterval",
    "MaxProbesPerSecond",
    "TimeoutSignal",
    "TimeoutTERM",
];

/// Keys of `InstanceTypes.<name>`.
const INSTANCE_TYPE_KEYS: &[&str] = &[
    "Name",
    "ProviderType",
    "VCPUs",
    "RAM",
    "Scratch",
    "IncludedScratch",
    "AddedScratch",
    "Price",
    "Preemptible",
    "GPU",
    "CUDA",
];

/// Keys of `InstanceTypes.<name>.GPU`.
const GPU_KEYS: &[&str] = &[
    "Stack",
    "DriverVersion",
    "HardwareTarget",
    "DeviceCount",
    "VRAM",
];

/// Keys of the legacy `InstanceTypes.<name>.CUDA`.
const CUDA_KEYS: &[&str] = &["DriverVersion", "HardwareCapability", "DeviceCount"];

/// The services the dispatcher reads under `Services` (the others are accepted silently).
const SERVICE_NAMES: &[&str] = &["Controller", "DispatchCloud"];

/// Keys of `Services.<name>`.
const SERVICE_KEYS: &[&str] = &["InternalURLs", "ExternalURL"];

/// Keys of `Services.<name>.InternalURLs.<url>`.
const SERVICE_INSTANCE_KEYS: &[&str] = &["ListenURL", "Rendezvous"];

/// The drivers this dispatcher has.
const DRIVERS: &[&str] = &["ec2", "azure", "loopback"];

/// Arvados warns about tokens shorter than this.
const MIN_TOKEN_LENGTH: usize = 32;

/// Loads the config from its parsed YAML. `origin` names the source in messages about the file as
/// a whole.
pub(super) fn load(root: &Value, origin: &str) -> Result<Loaded, ConfigError> {
    let mut w = Vec::new();
    let root = untag(root);
    if !matches!(root, Value::Mapping(_) | Value::Null) {
        return Err(ConfigError::invalid(
            "",
            format!(
                "{origin}: expected a mapping with a Clusters key, got {}",
                kind(root)
            ),
        ));
    }
    let top = Section::new("", Some(root), TOP_KEYS, Keys::Strict, &mut w)?;
    let clusters = mapping_entries("Clusters", top.get("Clusters").map(|e| e.value))?;
    let (key, entry) = match clusters.len() {
        0 => {
            return Err(ConfigError::invalid(
                "",
                format!("{origin}: config does not define any clusters (expected Clusters.<id>)"),
            ));
        }
        1 => clusters.into_iter().next().expect("one cluster"),
        n => {
            let names: Vec<&str> = clusters.iter().map(|(k, _)| k.as_str()).collect();
            return Err(ConfigError::invalid(
                "Clusters",
                format!(
                    "{n} clusters are configured ({}); the dispatcher serves exactly one",
                    names.join(", ")
                ),
            ));
        }
    };
    load_cluster(&key, &entry, w)
}

/// Loads `Clusters.<key>`.
fn load_cluster(key: &str, entry: &Entry<'_>, mut w: Vec<String>) -> Result<Loaded, ConfigError> {
    let cl = Section::new(
        &entry.path,
        Some(entry.value),
        CLUSTER_KEYS,
        Keys::Strict,
        &mut w,
    )?;
    let mut cluster_id = cl.string("ClusterID", key)?;
    if cluster_id.is_empty() {
        cluster_id = key.to_string();
    }
    if cluster_id.len() != 5
        || !cluster_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        w.push(format!(
            "{}: cluster ID {cluster_id:?} should be 5 lower-case alphanumeric characters",
            cl.path
        ));
    }

    let system_root_token = cl.secret("SystemRootToken")?;
    let management_token = cl.secret("ManagementToken")?;
    check_token(
        &cl.path_of("SystemRootToken"),
        &system_root_token,
        "the dispatcher cannot use the controller API",
        &mut w,
    );
    check_token(
        &cl.path_of("ManagementToken"),
        &management_token,
        "the management API and metrics are disabled",
        &mut w,
    );

    let services = sub(&cl, "Services", SERVICE_NAMES, Keys::Lenient, &mut w)?;
    let controller_url = read_controller(&services, &mut w)?;
    let tls = sub(&cl, "TLS", &["Insecure"], Keys::Lenient, &mut w)?;
    let tls_insecure = tls.bool("Insecure", false)?;
    let listen = read_listen(&cl, &services, &mut w)?;

    let mut containers = sub(&cl, "Containers", CONTAINERS_KEYS, Keys::Strict, &mut w)?;
    let mut cloud = sub(&containers, "CloudVMs", CLOUDVMS_KEYS, Keys::Strict, &mut w)?;
    merge_legacy(&cl, &mut containers, &mut cloud, &mut w)?;

    let containers_config = read_containers(&containers, &mut w)?;
    let dispatch_private_key = containers.secret("DispatchPrivateKey")?;
    if dispatch_private_key.is_empty() {
        w.push(format!(
            "{}: not set; the dispatcher cannot log in to worker VMs",
            containers.get("DispatchPrivateKey").map_or_else(
                || containers.path_of("DispatchPrivateKey"),
                |e| e.path.clone()
            )
        ));
    }
    let cloud_config = read_cloud_vms(&cloud, &mut w)?;
    let driver_parameters = match cloud.get("DriverParameters") {
        Some(e) => to_json(&e.path, e.value)?,
        None => serde_json::Value::Object(serde_json::Map::new()),
    };
    if !driver_parameters.is_object() {
        let path = cloud
            .get("DriverParameters")
            .map_or_else(String::new, |e| e.path.clone());
        return Err(ConfigError::invalid(&path, "expected a mapping"));
    }

    let types_path = cl.path_of("InstanceTypes");
    let mut types = read_instance_types(&types_path, cl.get("InstanceTypes"), &mut w)?;
    if cloud_config.driver == "loopback" {
        match types.len() {
            0 => {
                let t = host::localhost_type().map_err(|e| {
                    ConfigError::invalid(
                        &types_path,
                        format!("cannot size the loopback \"localhost\" type: {e}"),
                    )
                })?;
                types.insert(t.name.clone(), t);
            }
            1 => {}
            n => {
                return Err(ConfigError::invalid(
                    &types_path,
                    format!("the loopback driver supports at most one instance type, found {n}"),
                ));
            }
        }
    } else if types.is_empty() {
        w.push(format!(
            "{types_path}: no instance types configured; no container can be dispatched"
        ));
    }
    add_preemptible_variants(
        &types_path,
        &mut types,
        containers_config.preemptible_price_factor,
        &mut w,
    );
    if cloud_config.driver == "ec2" {
        let groups = read_quota_groups(&cloud)?;
        for t in types.values_mut() {
            t.quota_group = ec2_quota_group(&t.provider_type, t.preemptible, &groups);
        }
    }

    let instance_set_id = super::instance_set_id(&system_root_token);
    let core = Config {
        cluster_id: cluster_id.clone(),
        instance_types: types,
        containers: containers_config,
        cloud_vms: cloud_config,
        tuning: Tuning::default(),
    };
    Ok(Loaded {
        cluster_id,
        core,
        secrets: Secrets {
            system_root_token,
            management_token,
            dispatch_private_key,
        },
        controller_url,
        tls_insecure,
        listen,
        driver_parameters,
        instance_set_id,
        warnings: w,
    })
}

/// The section under `key` of `parent` (empty if absent).
fn sub<'a>(
    parent: &Section<'a>,
    key: &str,
    known: &[&'static str],
    mode: Keys,
    w: &mut Vec<String>,
) -> Result<Section<'a>, ConfigError> {
    match parent.get(key) {
        Some(e) => Section::new(&e.path, Some(e.value), known, mode, w),
        None => Ok(Section::empty(&parent.path_of(key))),
    }
}

/// Warns about an unset, short or oddly spelled token. The token itself is never shown.
fn check_token(path: &str, token: &str, unset_effect: &str, w: &mut Vec<String>) {
    if token.is_empty() {
        w.push(format!("{path}: secret token is not set; {unset_effect}"));
        return;
    }
    // A v2 token is "v2/<uuid>/<secret>": the secret part is what is checked.
    let bits: Vec<&str> = token.split('/').collect();
    let secret = if bits.len() == 3 && bits[0] == "v2" {
        bits[2]
    } else {
        token
    };
    if !secret.bytes().all(|b| b.is_ascii_alphanumeric()) {
        w.push(format!(
            "{path}: unacceptable characters in token (only a-z, A-Z, 0-9 are acceptable)"
        ));
    } else if secret.len() < MIN_TOKEN_LENGTH {
        w.push(format!(
            "{path}: token is too short (should be at least {MIN_TOKEN_LENGTH} characters)"
        ));
    }
}

/// The URL of the controller: `Services.Controller.ExternalURL`, else its first InternalURL.
fn read_controller(
    services: &Section<'_>,
    w: &mut Vec<String>,
) -> Result<Option<String>, ConfigError> {
    let svc = sub(services, "Controller", SERVICE_KEYS, Keys::Lenient, w)?;
    let external = svc.string("ExternalURL", "")?;
    if !external.is_empty() && external != "-" {
        return Ok(Some(external));
    }
    let internal = mapping_entries(
        &svc.path_of("InternalURLs"),
        svc.get("InternalURLs").map(|e| e.value),
    )?;
    if let Some((url, _)) = internal.into_iter().find(|(k, _)| k != "SAMPLE") {
        return Ok(Some(url));
    }
    w.push(format!(
        "{}: neither ExternalURL nor InternalURLs is set; the dispatcher cannot reach the controller",
        svc.path
    ));
    Ok(None)
}

/// The dispatcher's listen address: the first `Services.DispatchCloud.InternalURLs` key (or its
/// `ListenURL`), else a legacy `NodeProfiles.*.arvados-dispatch-cloud.Listen`.
fn read_listen(
    cl: &Section<'_>,
    services: &Section<'_>,
    w: &mut Vec<String>,
) -> Result<Option<String>, ConfigError> {
    let svc = sub(services, "DispatchCloud", SERVICE_KEYS, Keys::Strict, w)?;
    svc.string("ExternalURL", "")?;
    let urls_path = svc.path_of("InternalURLs");
    let mut current = None;
    let mut count = 0usize;
    for (url, entry) in mapping_entries(&urls_path, svc.get("InternalURLs").map(|e| e.value))? {
        if url == "SAMPLE" {
            continue;
        }
        let inst = Section::new(
            &entry.path,
            Some(entry.value),
            SERVICE_INSTANCE_KEYS,
            Keys::Strict,
            w,
        )?;
        let listen_url = inst.string("ListenURL", "")?;
        inst.string("Rendezvous", "")?;
        count += 1;
        if current.is_none() {
            current = Some(if listen_url.is_empty() {
                url
            } else {
                listen_url
            });
        }
    }
    if count > 1 {
        w.push(format!(
            "{urls_path}: {count} URLs are configured; this dispatcher listens on the first, {}",
            current.as_deref().unwrap_or_default()
        ));
    }

    // The legacy layout.
    let mut legacy: Option<(String, String)> = None;
    if let Some(np) = cl.get("NodeProfiles") {
        for (_, profile) in mapping_entries(&np.path, Some(np.value))? {
            for (svc_name, svc_entry) in mapping_entries(&profile.path, Some(profile.value))? {
                if svc_name != "arvados-dispatch-cloud" {
                    continue;
                }
                let s = Section::new(
                    &svc_entry.path,
                    Some(svc_entry.value),
                    &["Listen", "TLS", "Insecure"],
                    Keys::Strict,
                    w,
                )?;
                let Some(e) = s.get("Listen") else { continue };
                let value = e.string()?;
                if value.is_empty() {
                    continue;
                }
                if current.is_some() {
                    w.push(format!(
                        "{} is deprecated and ignored: {urls_path} is also set",
                        e.path
                    ));
                } else if let Some((first, _)) = &legacy {
                    w.push(format!(
                        "{} is deprecated and ignored: {first} is also set",
                        e.path
                    ));
                } else {
                    w.push(format!("{} is deprecated: use {urls_path}", e.path));
                    legacy = Some((e.path.clone(), value));
                }
            }
        }
    }
    Ok(current.or(legacy.map(|(_, v)| v)))
}

/// Moves the legacy cluster-level `CloudVMs` and `Dispatch` keys into the current sections.
fn merge_legacy<'a>(
    cl: &Section<'a>,
    containers: &mut Section<'a>,
    cloud: &mut Section<'a>,
    w: &mut Vec<String>,
) -> Result<(), ConfigError> {
    if let Some(legacy) = cl.get("CloudVMs") {
        w.push(format!("{} is deprecated: use {}", legacy.path, cloud.path));
        let old = Section::new(
            &legacy.path,
            Some(legacy.value),
            CLOUDVMS_KEYS,
            Keys::Strict,
            w,
        )?;
        for key in old.keys() {
            let e = old.get(key).expect("listed key").clone();
            if cloud.has(key) {
                w.push(format!(
                    "{} is ignored: {} is also set",
                    e.path,
                    cloud.path_of(key)
                ));
            } else {
                cloud.put(key, e);
            }
        }
    }
    if let Some(legacy) = cl.get("Dispatch") {
        let old = Section::new(
            &legacy.path,
            Some(legacy.value),
            DISPATCH_KEYS,
            Keys::Strict,
            w,
        )?;
        for &(old_key, into_cloud, new_key) in DISPATCH_MOVES {
            let Some(e) = old.get(old_key) else { continue };
            let target = if into_cloud {
                &mut *cloud
            } else {
                &mut *containers
            };
            move_legacy(e.clone(), target, new_key, w);
        }
    }
    if let Some(e) = containers.take("MaxComputeVMs") {
        move_legacy(e, cloud, "MaxInstances", w);
    }
    Ok(())
}

/// Puts a legacy entry under its new key unless the new key is set, with one warning either way.
fn move_legacy<'a>(
    e: Entry<'a>,
    target: &mut Section<'a>,
    new_key: &'static str,
    w: &mut Vec<String>,
) {
    let new_path = target.path_of(new_key);
    if target.has(new_key) {
        w.push(format!(
            "{} is deprecated and ignored: {new_path} is also set",
            e.path
        ));
    } else {
        w.push(format!("{} is deprecated: use {new_path}", e.path));
        target.put(new_key, e);
    }
}

/// The path of a key as read (a legacy path if it was moved), or where it would be.
fn entry_path(s: &Section<'_>, key: &str) -> String {
    s.get(key)
        .map_or_else(|| s.path_of(key), |e| e.path.clone())
}

/// A duration that falls back to `default` when 0 or less, as the Go pool does.
fn pool_duration(s: &Section<'_>, key: &str, default: Duration) -> Result<Duration, ConfigError> {
    let ns = s.duration(key, 0)?;
    Ok(if ns <= 0 {
        default
    } else {
        Duration::from_nanos(ns.unsigned_abs())
    })
}

/// A duration used as is; a negative one acts as 0.
fn plain_duration(
    s: &Section<'_>,
    key: &str,
    default: Duration,
    w: &mut Vec<String>,
) -> Result<Duration, ConfigError> {
    let default_ns = i64::try_from(default.as_nanos()).expect("defaults fit in i64");
    let ns = s.duration(key, default_ns)?;
    if ns < 0 {
        w.push(format!(
            "{}: negative duration is treated as 0",
            entry_path(s, key)
        ));
        return Ok(Duration::ZERO);
    }
    Ok(Duration::from_nanos(ns.unsigned_abs()))
}

/// A count; a negative one means the same as 0 (none or unlimited), as in Go.
fn count(
    s: &Section<'_>,
    key: &str,
    default: usize,
    w: &mut Vec<String>,
) -> Result<usize, ConfigError> {
    let default = i64::try_from(default).expect("defaults fit in i64");
    let n = s.int(key, default)?;
    if n < 0 {
        w.push(format!(
            "{}: negative value {n} is treated as 0",
            entry_path(s, key)
        ));
        return Ok(0);
    }
    usize::try_from(n)
        .map_err(|_| ConfigError::invalid(entry_path(s, key), format!("{n} is too large")))
}

/// `Containers.*`.
fn read_containers(s: &Section<'_>, w: &mut Vec<String>) -> Result<ContainersConfig, ConfigError> {
    let d = ContainersConfig::default();
    let runtime_engine = s.string("RuntimeEngine", &d.runtime_engine)?;
    if runtime_engine != "docker" && runtime_engine != "singularity" {
        w.push(format!(
            "{}: {runtime_engine:?} is not a runtime engine that crunch-run knows (docker or singularity)",
            entry_path(s, "RuntimeEngine")
        ));
    }
    Ok(ContainersConfig {
        max_dispatch_attempts: s.int("MaxDispatchAttempts", d.max_dispatch_attempts)?,
        stale_lock_timeout: plain_duration(s, "StaleLockTimeout", d.stale_lock_timeout, w)?,
        reserve_extra_ram: s.byte_size("ReserveExtraRAM", d.reserve_extra_ram)?,
        local_keep_blob_buffers_per_vcpu: s.int(
            "LocalKeepBlobBuffersPerVCPU",
            d.local_keep_blob_buffers_per_vcpu,
        )?,
        maximum_price_factor: s.float("MaximumPriceFactor", d.maximum_price_factor)?,
        preemptible_price_factor: s.float("PreemptiblePriceFactor", d.preemptible_price_factor)?,
        crunch_run_command: s.string("CrunchRunCommand", &d.crunch_run_command)?,
        crunch_run_arguments_list: s.string_list("CrunchRunArgumentsList")?,
        runtime_engine,
    })
}

/// `Containers.CloudVMs.*`.
fn read_cloud_vms(s: &Section<'_>, w: &mut Vec<String>) -> Result<CloudVmsConfig, ConfigError> {
    let d = CloudVmsConfig::default();
    // Enable matters only to `arvados-server boot`; its type is still checked.
    s.bool("Enable", false)?;
    let driver = s.string("Driver", &d.driver)?;
    if !DRIVERS.contains(&driver.as_str()) {
        return Err(ConfigError::invalid(
            entry_path(s, "Driver"),
            format!("unknown driver {driver:?} (expected ec2, azure or loopback)"),
        ));
    }
    let max_probes = s.float("MaxProbesPerSecond", d.max_probes_per_second)?;
    let max_cloud_ops = s.float("MaxCloudOpsPerSecond", d.max_cloud_ops_per_second)?;
    let mut boot_probe_command = s.string("BootProbeCommand", &d.boot_probe_command)?;
    if boot_probe_command.is_empty() {
        boot_probe_command = "true".into();
    }
    let mut ssh_port = s.string("SSHPort", &d.ssh_port)?;
    if ssh_port.is_empty() {
        ssh_port = "ssh".into();
    }
    let supervisor_fraction = s.float("SupervisorFraction", d.supervisor_fraction)?;
    if !(0.0..=1.0).contains(&supervisor_fraction) {
        w.push(format!(
            "{}: {supervisor_fraction} is outside 0..1",
            entry_path(s, "SupervisorFraction")
        ));
    }
    Ok(CloudVmsConfig {
        driver,
        poll_interval: plain_duration(s, "PollInterval", d.poll_interval, w)?,
        max_instances: count(s, "MaxInstances", d.max_instances, w)?,
        initial_quota_estimate: count(s, "InitialQuotaEstimate", d.initial_quota_estimate, w)?,
        supervisor_fraction,
        max_running_containers_per_instance: count(
            s,
            "MaxRunningContainersPerInstance",
            d.max_running_containers_per_instance,
            w,
        )?,
        max_cloud_ops_per_second: max_cloud_ops.max(0.0),
        max_concurrent_instance_create_ops: count(
            s,
            "MaxConcurrentInstanceCreateOps",
            d.max_concurrent_instance_create_ops,
            w,
        )?,
        sync_interval: pool_duration(s, "SyncInterval", d.sync_interval)?,
        probe_interval: pool_duration(s, "ProbeInterval", d.probe_interval)?,
        max_probes_per_second: if max_probes > 0.0 {
            max_probes
        } else {
            d.max_probes_per_second
        },
        boot_probe_command,
        timeout_idle: pool_duration(s, "TimeoutIdle", d.timeout_idle)?,
        timeout_booting: pool_duration(s, "TimeoutBooting", d.timeout_booting)?,
        timeout_probe: pool_duration(s, "TimeoutProbe", d.timeout_probe)?,
        timeout_shutdown: pool_duration(s, "TimeoutShutdown", d.timeout_shutdown)?,
        timeout_signal: pool_duration(s, "TimeoutSignal", d.timeout_signal)?,
        timeout_term: pool_duration(s, "TimeoutTERM", d.timeout_term)?,
        timeout_stale_run_lock: pool_duration(s, "TimeoutStaleRunLock", d.timeout_stale_run_lock)?,
        ssh_port,
        image_id: s.string("ImageID", &d.image_id)?,
        instance_init_command: s.string("InstanceInitCommand", &d.instance_init_command)?,
        deploy_runner_binary: s.string("DeployRunnerBinary", &d.deploy_runner_binary)?,
        deploy_runner_directory: s.string("DeployRunnerDirectory", &d.deploy_runner_directory)?,
        deploy_public_key: s.bool("DeployPublicKey", d.deploy_public_key)?,
        resource_tags: s.string_map("ResourceTags")?,
        tag_key_prefix: s.string("TagKeyPrefix", &d.tag_key_prefix)?,
    })
}

/// `DriverParameters.InstanceTypeQuotaGroups`, merged over the shipped map. Values under
/// DriverParameters are never shown in messages.
fn read_quota_groups(cloud: &Section<'_>) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut groups = shipped_ec2_quota_groups();
    let Some(dp) = cloud.get("DriverParameters") else {
        return Ok(groups);
    };
    let mut ignored = Vec::new();
    let params = Section::new(
        &dp.path,
        Some(dp.value),
        &["InstanceTypeQuotaGroups"],
        Keys::Lenient,
        &mut ignored,
    )?;
    if let Some(e) = params.get("InstanceTypeQuotaGroups") {
        for (prefix, entry) in mapping_entries(&e.path, Some(e.value))? {
            match entry.value {
                Value::String(s) => {
                    groups.insert(prefix, s.clone());
                }
                Value::Number(n) => {
                    groups.insert(prefix, n.to_string());
                }
                Value::Null => {}
                other => {
                    return Err(ConfigError::invalid(
                        &entry.path,
                        format!("expected a string, got {}", kind(other)),
                    ));
                }
            }
        }
    }
    Ok(groups)
}

/// Converts a YAML value (DriverParameters) to JSON. Errors name the path, never a value.
fn to_json(path: &str, value: &Value) -> Result<serde_json::Value, ConfigError> {
    Ok(match untag(value) {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                serde_json::Value::from(i)
            } else if let Some(u) = n.as_u64() {
                serde_json::Value::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
        }
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Sequence(items) => serde_json::Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| to_json(&format!("{path}[{i}]"), v))
                .collect::<Result<_, _>>()?,
        ),
        Value::Mapping(m) => {
            let mut out = serde_json::Map::new();
            for (k, v) in m {
                let key = key_text(path, k)?;
                let child = to_json(&join(path, &key), v)?;
                out.insert(key, child);
            }
            serde_json::Value::Object(out)
        }
        Value::Tagged(_) => unreachable!("untag removes tags"),
    })
}

/// `InstanceTypes`: a mapping keyed by name, or (old configs) a list of entries with `Name`.
fn read_instance_types(
    path: &str,
    entry: Option<&Entry<'_>>,
    w: &mut Vec<String>,
) -> Result<BTreeMap<String, InstanceType>, ConfigError> {
    let mut types = BTreeMap::new();
    let Some(entry) = entry else {
        return Ok(types);
    };
    if let Value::Sequence(items) = entry.value {
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let s = Section::new(
                &item_path,
                Some(untag(item)),
                INSTANCE_TYPE_KEYS,
                Keys::Strict,
                w,
            )?;
            let name = s.string("Name", "")?;
            if name.is_empty() {
                return Err(ConfigError::invalid(
                    &item_path,
                    "an instance type in a list needs a Name",
                ));
            }
            if types.contains_key(&name) {
                return Err(ConfigError::invalid(
                    &item_path,
                    format!("duplicate instance type name {name:?}"),
                ));
            }
            let t = read_instance_type(&name, &s, w)?;
            types.insert(name, t);
        }
        return Ok(types);
    }
    for (name, e) in mapping_entries(path, Some(entry.value))? {
        if name == "SAMPLE" {
            continue;
        }
        let s = Section::new(&e.path, Some(e.value), INSTANCE_TYPE_KEYS, Keys::Strict, w)?;
        if let Some(n) = s.get("Name") {
            let given = n.string()?;
            if given != name {
                w.push(format!(
                    "{}: ignored: the type's name is its key, {name:?}",
                    n.path
                ));
            }
        }
        let t = read_instance_type(&name, &s, w)?;
        types.insert(name, t);
    }
    Ok(types)
}

/// One instance type (reference-scheduler.md §5.1).
fn read_instance_type(
    name: &str,
    s: &Section<'_>,
    w: &mut Vec<String>,
) -> Result<InstanceType, ConfigError> {
    let mut provider_type = s.string("ProviderType", "")?;
    if provider_type.is_empty() {
        provider_type = name.to_string();
    }
    let vcpus = s.int("VCPUs", 0)?;
    let ram = s.byte_size("RAM", 0)?;
    let included_scratch = s.byte_size("IncludedScratch", 0)?;
    let added_scratch = s.byte_size("AddedScratch", 0)?;
    let scratch = included_scratch.checked_add(added_scratch).ok_or_else(|| {
        ConfigError::invalid(&s.path, "IncludedScratch + AddedScratch is out of range")
    })?;
    if s.has("Scratch") {
        let configured = s.byte_size("Scratch", 0)?;
        w.push(format!(
            "{}: ignored ({}): the scratch space is IncludedScratch + AddedScratch, here {}",
            s.path_of("Scratch"),
            format_bytes(configured),
            format_bytes(scratch)
        ));
    }
    let price = s.float("Price", 0.0)?;
    let preemptible = s.bool("Preemptible", false)?;
    let mut gpu_path = s.path_of("GPU");
    let mut gpu = match s.get("GPU") {
        Some(e) => {
            let g = Section::new(&e.path, Some(e.value), GPU_KEYS, Keys::Strict, w)?;
            GpuSpec {
                stack: g.string("Stack", "")?,
                driver_version: g.string("DriverVersion", "")?,
                hardware_target: g.string("HardwareTarget", "")?,
                device_count: g.int("DeviceCount", 0)?,
                vram: g.byte_size("VRAM", 0)?,
            }
        }
        None => GpuSpec::default(),
    };
    if let Some(e) = s.get("CUDA") {
        let c = Section::new(&e.path, Some(e.value), CUDA_KEYS, Keys::Strict, w)?;
        let device_count = c.int("DeviceCount", 0)?;
        if s.has("GPU") {
            w.push(format!(
                "{} is deprecated and ignored: {gpu_path} is also set",
                e.path
            ));
        } else {
            w.push(format!("{} is deprecated: use {gpu_path}", e.path));
            if device_count > 0 {
                gpu = GpuSpec {
                    stack: "cuda".into(),
                    driver_version: c.string("DriverVersion", "")?,
                    hardware_target: c.string("HardwareCapability", "")?,
                    device_count,
                    vram: 0,
                };
                gpu_path = e.path.clone();
            }
        }
    }
    if gpu.device_count > 0 {
        if gpu.driver_version.trim().parse::<f64>().is_err() {
            return Err(ConfigError::invalid(
                join(&gpu_path, "DriverVersion"),
                format!(
                    "invalid driver version {:?}: a type with GPUs needs a DriverVersion that is a number, such as \"12.4\"",
                    gpu.driver_version
                ),
            ));
        }
        if !matches!(gpu.stack.as_str(), "cuda" | "rocm") {
            w.push(format!(
                "{}: {:?} is not a GPU stack that crunch-run knows (cuda or rocm)",
                join(&gpu_path, "Stack"),
                gpu.stack
            ));
        }
    }
    if vcpus <= 0 {
        w.push(format!(
            "{}: {vcpus} VCPUs; no container can run on this type",
            s.path_of("VCPUs")
        ));
    }
    if ram <= 0 {
        w.push(format!(
            "{}: no RAM; no container can run on this type",
            s.path_of("RAM")
        ));
    }
    if price < 0.0 {
        w.push(format!("{}: negative price {price}", s.path_of("Price")));
    }
    Ok(InstanceType {
        name: name.to_string(),
        provider_type,
        vcpus,
        ram,
        included_scratch,
        added_scratch,
        scratch,
        price,
        preemptible,
        gpu,
        quota_group: String::new(),
    })
}

/// Adds a `<name>.preemptible` variant of each non-preemptible type when the factor is positive.
/// A configured entry of that name is kept; if it differs from the variant, a warning says so.
fn add_preemptible_variants(
    path: &str,
    types: &mut BTreeMap<String, InstanceType>,
    factor: f64,
    w: &mut Vec<String>,
) {
    if factor <= 0.0 {
        return;
    }
    let originals: Vec<InstanceType> = types.values().filter(|t| !t.preemptible).cloned().collect();
    for t in originals {
        let variant = InstanceType {
            name: format!("{}.preemptible", t.name),
            preemptible: true,
            price: t.price * factor,
            ..t.clone()
        };
        match types.get(&variant.name) {
            Some(existing) if *existing != variant => w.push(format!(
                "{}: already configured and different from the automatic preemptible variant of {} (price {} × PreemptiblePriceFactor {factor}); the configured entry is kept",
                join(path, &variant.name),
                t.name,
                t.price
            )),
            Some(_) => {}
            None => {
                types.insert(variant.name.clone(), variant);
            }
        }
    }
}

/// The InstanceSetID for a token (reference-workers.md §4.1): the UUID of a `v2/<uuid>/<secret>`
/// token, else the hex MD5 of the token.
pub(super) fn instance_set_id(token: &str) -> String {
    let bits: Vec<&str> = token.split('/').collect();
    if bits.len() == 3 && bits[0] == "v2" {
        return bits[1].to_string();
    }
    Md5::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
