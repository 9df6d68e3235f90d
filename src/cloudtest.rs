//! `arvados-dispatch-cloud cloudtest`: a smoke test of the configured cloud driver and
//! settings (reference-workers.md §6.5), run by an operator before starting the dispatcher.
//!
//! It creates one instance with the configured driver, image, tags and init command, checks
//! that the cloud lists it with every tag, reaches it over SSH with the dispatcher's key and the
//! same host-key check the dispatcher uses (the driver's own, else the instance secret), runs
//! `BootProbeCommand` until it succeeds, runs an optional operator command, and destroys the
//! instance again. The sequence of one run:
//!
//! 1. Set up the driver from `CloudVMs.Driver` and `DriverParameters`.
//! 2. List every instance (no filter) and log the count. Instances tagged with the test's
//!    InstanceSetID are destroyed with `destroy_existing` (then the list is repeated after
//!    `SyncInterval` until none remain); without it the run fails.
//! 3. Create with the shared tags (`ResourceTags` plus `<TagKeyPrefix>CloudTestPID`), the
//!    InstanceSetID and a fresh InstanceSecret; no InstanceType or IdleBehavior tag. The init
//!    command is the one the dispatcher's creates use ([`init_command`]); the dispatcher's public
//!    key is passed only if `DeployPublicKey` is on.
//! 4. A create error is a failure, but the instance may exist anyway: the list is repeated every
//!    `SyncInterval` until it shows up or `TimeoutBooting` passes. After a successful create the
//!    instance must be in the very next list.
//! 5. Every shared tag must be on the instance. Then `BootProbeCommand` runs over SSH every
//!    `ProbeInterval` (the instance is listed again between tries) until it succeeds or
//!    `TimeoutBooting` passes; `skip_boot_probe` leaves this SSH probe out.
//! 6. The optional operator command runs (non-zero is a failure); then an optional pause until
//!    the operator presses Enter.
//! 7. Destroy, then list until the instance is gone, calling destroy again every `SyncInterval`
//!    for as long as it takes.
//!
//! When `DriverParameters.SubnetID` lists several subnets, the whole sequence runs once per
//! subnet, with `SubnetID` set to that one subnet, and the test fails if any run fails.
//!
//! Every check that fails is logged when it happens and recorded in the [`Report`]; the run
//! carries on where that makes sense (so a failed boot probe still destroys the instance).
//!
//! Invariant: no secret reaches a log line or an error: the instance secret is replaced by
//! `<redacted>` in the logged tags and init command, the dispatcher's private key is only handed
//! to the SSH client, and DriverParameters (cloud credentials) are never printed.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::cloud::{self, CloudError, CloudErrorKind, CreateRequest, InstanceInfo, InstanceSet};
use crate::config::Loaded;
use crate::core::pool::remote::init_command;
use crate::core::types::InstanceType;
use crate::ssh::{self, Executor, ExecutorConfig, KeyError, SshError};

/// The InstanceSetID tag value of the test instance unless `-instance-set-id` says otherwise.
pub const DEFAULT_INSTANCE_SET_ID: &str = "zzzzz-zzzzz-zzzzzzcloudtest";

/// How long the operator's `-command` may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3600);

/// What shows in place of the instance secret in log lines.
const REDACTED: &str = "<redacted>";

/// The command-line choices of one cloudtest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The InstanceSetID tag value of the test instance.
    pub instance_set_id: String,
    /// The image to boot; `None` means `CloudVMs.ImageID`.
    pub image_id: Option<String>,
    /// The configured instance type to create; `None` means the cheapest one.
    pub instance_type: Option<String>,
    /// Destroy instances already tagged with `instance_set_id` instead of failing.
    pub destroy_existing: bool,
    /// A shell command to run on the instance after it booted.
    pub command: Option<String>,
    /// Leave out the SSH boot probe of step 5 (the tag check still runs).
    pub skip_boot_probe: bool,
    /// Wait for a line on stdin before destroying the instance.
    pub pause_before_destroy: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            instance_set_id: DEFAULT_INSTANCE_SET_ID.to_string(),
            image_id: None,
            instance_type: None,
            destroy_existing: false,
            command: None,
            skip_boot_probe: false,
            pause_before_destroy: false,
        }
    }
}

/// A cloudtest that cannot start: the config or the options are unusable. Messages never hold
/// a secret.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `InstanceTypes` is empty.
    #[error("no instance types are configured (InstanceTypes is empty)")]
    NoInstanceTypes,
    /// `-instance-type` names a type the config does not have.
    #[error("requested instance type {name:?} is not configured (configured: {known})")]
    UnknownInstanceType {
        /// The name given.
        name: String,
        /// The configured names, comma-separated.
        known: String,
    },
    /// The dispatcher's private key is needed but missing or unusable.
    #[error("Containers.DispatchPrivateKey: {0}")]
    Key(String),
    /// The OS gave no random bytes for the instance secret.
    #[error("cannot make an instance secret: {0}")]
    Random(String),
}

impl From<KeyError> for SetupError {
    fn from(e: KeyError) -> Self {
        SetupError::Key(e.to_string())
    }
}

/// The outcome of a cloudtest: every failed check, in order. Empty means everything passed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One sentence per failed check.
    pub failures: Vec<String>,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Runs the cloudtest for `loaded` with `opts`: once, or once per subnet when
/// `DriverParameters.SubnetID` lists several. Errors only when the test cannot start; failed
/// checks are in the [`Report`].
pub async fn run(loaded: &Loaded, opts: &Options) -> Result<Report, SetupError> {
    let vms = &loaded.core.cloud_vms;
    let instance_type = choose_instance_type(loaded, opts.instance_type.as_deref())?;
    let needs_key = vms.deploy_public_key || !opts.skip_boot_probe || opts.command.is_some();
    let ssh_config = if needs_key {
        if loaded.secrets.dispatch_private_key.trim().is_empty() {
            return Err(SetupError::Key(
                "not set, and the test needs it (DeployPublicKey, the boot probe or -command)"
                    .into(),
            ));
        }
        let key = ssh::load_private_key(&loaded.secrets.dispatch_private_key)?;
        Some(ExecutorConfig::new(key, vms.ssh_port.clone()))
    } else {
        None
    };
    let mut shared_tags = vms.resource_tags.clone();
    shared_tags.insert(
        format!("{}CloudTestPID", vms.tag_key_prefix),
        std::process::id().to_string(),
    );
    let plan = Plan {
        loaded,
        opts,
        instance_type,
        image_id: opts
            .image_id
            .clone()
            .unwrap_or_else(|| vms.image_id.clone()),
        shared_tags,
        ssh_config,
    };
    tracing::info!(
        driver = %vms.driver,
        instance_type = %plan.instance_type.name,
        provider_type = %plan.instance_type.provider_type,
        image_id = %plan.image_id,
        instance_set_id = %opts.instance_set_id,
        "cloudtest starting"
    );

    let mut report = Report::default();
    match subnet_runs(&loaded.driver_parameters) {
        SubnetRuns::One => {
            let secret = random_hex(40)?;
            report.failures = Tester::new(&plan, secret, None)
                .run(&loaded.driver_parameters)
                .await;
        }
        SubnetRuns::Each(subnets) => {
            for (i, subnet) in subnets.into_iter().enumerate() {
                let label = format!("SubnetID[{i}]");
                let Some(subnet) = subnet else {
                    let msg = format!(
                        "{label}: CloudVMs.DriverParameters.SubnetID[{i}] is invalid: it must be a string"
                    );
                    tracing::error!("{msg}");
                    report.failures.push(msg);
                    continue;
                };
                tracing::info!(subnet = %subnet, "running tests using {label} {subnet:?}");
                let mut params = loaded.driver_parameters.clone();
                if let Some(obj) = params.as_object_mut() {
                    obj.insert("SubnetID".into(), serde_json::Value::String(subnet.clone()));
                }
                let secret = random_hex(40)?;
                let failures = Tester::new(&plan, secret, Some(format!("{label} {subnet:?}")))
                    .run(&params)
                    .await;
                if !failures.is_empty() {
                    tracing::info!(subnet = %subnet, "failed tests using {label} {subnet:?}");
                }
                report.failures.extend(failures);
            }
        }
    }
    if report.passed() {
        tracing::info!("cloudtest passed: every check succeeded");
    } else {
        for f in &report.failures {
            tracing::error!(failure = %f, "cloudtest check failed");
        }
        tracing::error!(
            failed = report.failures.len(),
            "cloudtest FAILED: {} check(s) failed",
            report.failures.len()
        );
    }
    Ok(report)
}

/// The named configured type, or the cheapest (then first by name) if `name` is `None`.
pub fn choose_instance_type(
    loaded: &Loaded,
    name: Option<&str>,
) -> Result<Arc<InstanceType>, SetupError> {
    let types = &loaded.core.instance_types;
    if types.is_empty() {
        return Err(SetupError::NoInstanceTypes);
    }
    match name {
        None | Some("") => loaded
            .core
            .types_by_price()
            .first()
            .map(|t| Arc::new((*t).clone()))
            .ok_or(SetupError::NoInstanceTypes),
        Some(n) => types.get(n).map(|t| Arc::new(t.clone())).ok_or_else(|| {
            SetupError::UnknownInstanceType {
                name: n.to_string(),
                known: types.keys().cloned().collect::<Vec<_>>().join(", "),
            }
        }),
    }
}

/// How many times the sequence runs.
#[derive(Debug, PartialEq, Eq)]
enum SubnetRuns {
    /// Once, with DriverParameters as configured.
    One,
    /// Once per listed subnet (`None`: an entry that is not a string).
    Each(Vec<Option<String>>),
}

/// Several subnets are a list (or a set written as a mapping, whose keys are the IDs) of two or
/// more entries.
fn subnet_runs(params: &serde_json::Value) -> SubnetRuns {
    let subnets: Vec<Option<String>> = match params.get("SubnetID") {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(serde_json::Value::Object(m)) => {
            let mut keys: Vec<String> = m.keys().cloned().collect();
            keys.sort();
            keys.into_iter().map(Some).collect()
        }
        _ => return SubnetRuns::One,
    };
    if subnets.len() > 1 {
        SubnetRuns::Each(subnets)
    } else {
        SubnetRuns::One
    }
}

/// What every run shares.
struct Plan<'a> {
    loaded: &'a Loaded,
    opts: &'a Options,
    instance_type: Arc<InstanceType>,
    image_id: String,
    shared_tags: BTreeMap<String, String>,
    ssh_config: Option<ExecutorConfig>,
}

/// Tags for a log line: the instance secret replaced by `<redacted>`.
struct ShownTags<'a> {
    tags: &'a BTreeMap<String, String>,
    secret_key: &'a str,
}

impl fmt::Display for ShownTags<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (k, v)) in self.tags.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let v = if k == self.secret_key { REDACTED } else { v };
            write!(f, "{k}={v:?}")?;
        }
        f.write_str("}")
    }
}

/// One run of the sequence (one subnet).
struct Tester<'a> {
    plan: &'a Plan<'a>,
    /// The instance secret (40 hex digits). Never logged.
    secret: String,
    /// Prefixes recorded failures when there are several runs.
    label: Option<String>,
    set_id_key: String,
    secret_key: String,
    set: Option<Arc<dyn InstanceSet>>,
    instance: Option<InstanceInfo>,
    executor: Option<Executor>,
    showed_login: bool,
    failures: Vec<String>,
}

impl<'a> Tester<'a> {
    fn new(plan: &'a Plan<'a>, secret: String, label: Option<String>) -> Self {
        let prefix = &plan.loaded.core.cloud_vms.tag_key_prefix;
        Tester {
            plan,
            secret,
            label,
            set_id_key: format!("{prefix}InstanceSetID"),
            secret_key: format!("{prefix}InstanceSecret"),
            set: None,
            instance: None,
            executor: None,
            showed_login: false,
            failures: Vec::new(),
        }
    }

    fn vms(&self) -> &crate::core::config::CloudVmsConfig {
        &self.plan.loaded.core.cloud_vms
    }

    fn set_id(&self) -> &str {
        &self.plan.opts.instance_set_id
    }

    /// Logs and records a failed check.
    fn fail(&mut self, msg: String) {
        let msg = match &self.label {
            Some(l) => format!("{l}: {msg}"),
            None => msg,
        };
        tracing::error!("{msg}");
        self.failures.push(msg);
    }

    /// Runs steps 1–7 with `params` as DriverParameters; returns the failures.
    async fn run(mut self, params: &serde_json::Value) -> Vec<String> {
        let driver = self.vms().driver.clone();
        match cloud::new_instance_set(&driver, params).await {
            Ok(set) => self.set = Some(set),
            Err(e) => {
                self.fail(format!("error initializing driver {driver:?}: {e}"));
                return self.failures;
            }
        }
        if self.remove_existing().await {
            self.create_and_check().await;
            self.destroy_test_instance().await;
        }
        if let Some(set) = self.set.take() {
            set.stop().await;
        }
        self.failures
    }

    fn set(&self) -> Arc<dyn InstanceSet> {
        Arc::clone(self.set.as_ref().expect("the driver is set up before use"))
    }

    fn cloud_timeout(&self) -> Duration {
        self.plan.loaded.core.tuning.cloud_call_timeout
    }

    /// Lists instances with `filter` and returns those carrying the test's InstanceSetID.
    async fn instances(
        &self,
        filter: &BTreeMap<String, String>,
    ) -> Result<Vec<InstanceInfo>, CloudError> {
        let set = self.set();
        tracing::info!(filter_tags = ?filter, "getting instance list");
        let t0 = Instant::now();
        let timeout = self.cloud_timeout();
        let all = tokio::time::timeout(timeout, set.list(filter))
            .await
            .unwrap_or_else(|_| Err(timed_out("list", timeout)))?;
        tracing::info!(duration = ?t0.elapsed(), n = all.len(), "got instance list");
        let set_id = self.set_id();
        Ok(all
            .into_iter()
            .filter(|i| i.tags.get(&self.set_id_key).map(String::as_str) == Some(set_id))
            .collect())
    }

    /// Step 2. Returns whether the run may go on.
    async fn remove_existing(&mut self) -> bool {
        loop {
            // No filter: the count covers the whole account, not only this InstanceSetID.
            let ours = match self.instances(&BTreeMap::new()).await {
                Ok(v) => v,
                Err(e) => {
                    self.fail(format!("error getting list of instances: {}", e.message));
                    return false;
                }
            };
            if ours.is_empty() {
                return true;
            }
            for inst in &ours {
                if self.plan.opts.destroy_existing {
                    tracing::info!(instance = %inst.id, instance_set_id = %self.set_id(),
                        "destroying existing instance with our InstanceSetID");
                    let t0 = Instant::now();
                    match self.destroy_call(&inst.id).await {
                        Ok(()) => tracing::info!(instance = %inst.id, duration = ?t0.elapsed(),
                            "destroy call succeeded"),
                        Err(e) => tracing::error!(instance = %inst.id, duration = ?t0.elapsed(),
                            error = %e.message, "error destroying existing instance"),
                    }
                } else {
                    tracing::error!(instance = %inst.id, instance_set_id = %self.set_id(),
                        "found existing instance with our InstanceSetID");
                }
            }
            if !self.plan.opts.destroy_existing {
                let ids: Vec<&str> = ours.iter().map(|i| i.id.as_str()).collect();
                self.fail(format!(
                    "found existing instance(s) with InstanceSetID {:?}: {}; cannot continue: clean up manually, use -destroy-existing, or choose a different -instance-set-id",
                    self.set_id(),
                    ids.join(", ")
                ));
                return false;
            }
            self.sleep_sync_interval().await;
        }
    }

    async fn destroy_call(&self, id: &str) -> Result<(), CloudError> {
        let set = self.set();
        let timeout = self.cloud_timeout();
        tokio::time::timeout(timeout, set.destroy(id))
            .await
            .unwrap_or_else(|_| Err(timed_out("destroy", timeout)))
    }

    /// Steps 3–6.
    async fn create_and_check(&mut self) {
        let vms = self.vms().clone();
        let mut tags = self.plan.shared_tags.clone();
        tags.insert(self.set_id_key.clone(), self.set_id().to_string());
        tags.insert(self.secret_key.clone(), self.secret.clone());
        let init = init_command(&self.secret, &vms.instance_init_command);
        let public_key = match (&self.plan.ssh_config, vms.deploy_public_key) {
            (Some(c), true) => Some(c.public_key().clone()),
            _ => None,
        };
        let boot_deadline = Instant::now() + vms.timeout_booting;
        tracing::info!(
            instance_type = %self.plan.instance_type.name,
            provider_type = %self.plan.instance_type.provider_type,
            image_id = %self.plan.image_id,
            tags = %ShownTags { tags: &tags, secret_key: &self.secret_key },
            init_command = ?init_command(REDACTED, &vms.instance_init_command),
            deploy_public_key = public_key.is_some(),
            "creating instance"
        );
        let req = CreateRequest {
            instance_type: Arc::clone(&self.plan.instance_type),
            image_id: self.plan.image_id.clone(),
            tags,
            init_command: init,
            public_key,
        };
        let set = self.set();
        let t0 = Instant::now();
        let timeout = self.cloud_timeout();
        let created = tokio::time::timeout(timeout, set.create(req))
            .await
            .unwrap_or_else(|_| Err(timed_out("create", timeout)));
        match created {
            Err(e) => {
                tracing::error!(duration = ?t0.elapsed(), error = %e.message, "error creating test instance");
                self.fail(format!("error creating test instance: {}", e.message));
                // The create may have worked all the same: wait for the instance to show up.
                tracing::info!(timeout_booting = ?vms.timeout_booting,
                    "waiting for the instance to appear anyway, in case the create response was wrong");
                loop {
                    if let Ok(true) = self.refresh().await {
                        break;
                    }
                    if Instant::now() >= boot_deadline {
                        self.fail(
                            "timed out (TimeoutBooting) waiting for the instance to appear after the create error"
                                .into(),
                        );
                        return;
                    }
                    self.sleep_sync_interval().await;
                }
                let id = self
                    .instance
                    .as_ref()
                    .map(|i| i.id.clone())
                    .unwrap_or_default();
                tracing::info!(instance = %id, "new instance appeared");
                self.show_login_info();
            }
            Ok(mut info) => {
                tracing::info!(instance = %info.id, duration = ?t0.elapsed(), "created instance");
                // The create answer may lack tags; the secret is needed for the host-key check.
                info.tags
                    .entry(self.secret_key.clone())
                    .or_insert_with(|| self.secret.clone());
                self.instance = Some(info);
                self.show_login_info();
                match self.refresh().await {
                    Ok(true) => {}
                    Ok(false) => self.fail(
                        "the driver's create succeeded, but the instance is not in the next list"
                            .into(),
                    ),
                    Err(e) => {
                        self.fail(format!("error getting list of instances: {}", e.message));
                        return;
                    }
                }
            }
        }

        self.check_tags();
        if self.plan.opts.skip_boot_probe {
            tracing::info!("skipping the boot probe (-skip-boot-probe)");
        } else {
            self.wait_for_boot(boot_deadline).await;
        }
        if let Some(cmd) = self.plan.opts.command.clone() {
            let deadline = Instant::now() + COMMAND_TIMEOUT;
            if let Err(e) = self.run_shell_command(&cmd, deadline).await {
                self.fail(format!("command {cmd:?} failed: {e}"));
            }
        }
        if self.plan.opts.pause_before_destroy {
            self.show_login_info_again();
            pause_for_enter().await;
        }
    }

    /// Lists the test's instances and keeps the test instance (by ID once known, else the
    /// first with our InstanceSetID) up to date. Ok(false) if it is not listed.
    async fn refresh(&mut self) -> Result<bool, CloudError> {
        let filter = BTreeMap::from([(self.set_id_key.clone(), self.set_id().to_string())]);
        let listed = match self.instances(&filter).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e.message, "error getting list of instances");
                return Err(e);
            }
        };
        let want = self.instance.as_ref().map(|i| i.id.clone());
        let found = listed
            .into_iter()
            .find(|i| want.as_ref().is_none_or(|id| *id == i.id));
        let Some(mut info) = found else {
            return Ok(false);
        };
        tracing::info!(instance = %info.id, address = %info.address, "found our instance in the list");
        info.tags
            .entry(self.secret_key.clone())
            .or_insert_with(|| self.secret.clone());
        self.instance = Some(info);
        if !self.showed_login {
            self.show_login_info();
        }
        Ok(true)
    }

    /// Step 5, first half: every shared tag is on the instance with its value.
    fn check_tags(&mut self) {
        let Some(info) = self.instance.clone() else {
            return;
        };
        let mut ok = true;
        for (k, v) in &self.plan.shared_tags {
            let got = info.tags.get(k);
            if got != Some(v) {
                ok = false;
                let got = got.map_or_else(|| "(missing)".to_string(), |g| format!("{g:?}"));
                self.fail(format!(
                    "tag {k:?} is missing from the test instance (expected {v:?}, got {got})"
                ));
            }
        }
        if ok {
            tracing::info!("all expected tags are present");
        }
    }

    /// Step 5, second half: the boot probe until it succeeds or `deadline` passes.
    async fn wait_for_boot(&mut self, deadline: Instant) {
        let cmd = self.vms().boot_probe_command.clone();
        let probe_interval = self.vms().probe_interval;
        let exec_timeout = self.plan.loaded.core.tuning.exec_timeout;
        let mut last_error = String::from("it never ran");
        while Instant::now() < deadline {
            match self
                .run_shell_command(&cmd, Instant::now() + exec_timeout)
                .await
            {
                Ok(()) => {
                    tracing::info!(command = %cmd, "boot probe succeeded");
                    return;
                }
                Err(e) => last_error = e,
            }
            tracing::info!(duration = ?probe_interval, "waiting ProbeInterval");
            tokio::time::sleep(probe_interval).await;
            let _ = self.refresh().await;
        }
        self.fail(format!(
            "boot probe command {cmd:?} did not succeed within TimeoutBooting ({:?}); last error: {last_error}",
            self.vms().timeout_booting
        ));
    }

    /// The executor for the test instance, pointed at its current address.
    fn executor(&mut self) -> Option<Executor> {
        let config = self.plan.ssh_config.clone()?;
        let info = self.instance.as_ref()?;
        let target = cloud::ssh_target(self.set(), info, &self.secret, None);
        match &self.executor {
            Some(e) => e.set_target(target),
            None => self.executor = Some(Executor::new(config, target)),
        }
        self.executor.clone()
    }

    /// Runs `cmd` on the instance; Err describes the failure (exit status, output).
    async fn run_shell_command(&mut self, cmd: &str, deadline: Instant) -> Result<(), String> {
        let Some(exr) = self.executor() else {
            return Err("no SSH executor (no instance, or no DispatchPrivateKey)".into());
        };
        tracing::info!(command = %cmd, "executing remote command");
        let t0 = Instant::now();
        let result = exr.exec(cmd, b"", &[], deadline).await;
        let duration = t0.elapsed();
        match result {
            Ok(out) => {
                tracing::info!(command = %cmd, ?duration,
                    stdout = ?String::from_utf8_lossy(&out.stdout),
                    stderr = ?String::from_utf8_lossy(&out.stderr),
                    "remote command succeeded");
                Ok(())
            }
            Err(e) => {
                let (stdout, stderr) = match &e {
                    SshError::Exit { stdout, stderr, .. }
                    | SshError::Signal { stdout, stderr, .. }
                    | SshError::NoExitStatus { stdout, stderr, .. } => (
                        String::from_utf8_lossy(stdout).into_owned(),
                        String::from_utf8_lossy(stderr).into_owned(),
                    ),
                    _ => (String::new(), String::new()),
                };
                tracing::info!(command = %cmd, ?duration, stdout = ?stdout, stderr = ?stderr,
                    error = %e, "remote command failed");
                let mut msg = e.to_string();
                let stderr = stderr.trim();
                if !stderr.is_empty() {
                    msg.push_str(&format!(" (stderr: {stderr:?})"));
                }
                Err(msg)
            }
        }
    }

    /// Logs `ssh -p<port> <user>@<host>` once the instance has an address.
    fn show_login_info(&mut self) {
        let Some(info) = &self.instance else {
            return;
        };
        let Ok((host, port)) = ssh::resolve_address(&info.address, &self.vms().ssh_port) else {
            return;
        };
        let command = format!("ssh -p{port} {}@{host}", info.remote_user);
        tracing::info!(command = %command, "showing login information");
        self.showed_login = true;
    }

    fn show_login_info_again(&mut self) {
        self.showed_login = false;
        self.show_login_info();
    }

    /// Step 7: destroy until the instance is no longer listed. This never gives up.
    async fn destroy_test_instance(&mut self) {
        let Some(id) = self.instance.as_ref().map(|i| i.id.clone()) else {
            return;
        };
        if let Some(exr) = self.executor.take() {
            exr.close().await;
        }
        loop {
            tracing::info!(instance = %id, "destroying instance");
            let t0 = Instant::now();
            match self.destroy_call(&id).await {
                Ok(()) => {
                    tracing::info!(instance = %id, duration = ?t0.elapsed(), "destroyed instance")
                }
                Err(e) if e.kind == CloudErrorKind::NotFound => {
                    tracing::info!(instance = %id, error = %e.message, "the cloud does not know the instance (any more)")
                }
                Err(e) => {
                    tracing::error!(instance = %id, duration = ?t0.elapsed(), error = %e.message,
                        "error destroying instance")
                }
            }
            match self.refresh().await {
                Ok(false) => {
                    tracing::info!(instance = %id, "instance no longer appears in the list");
                    self.instance = None;
                    return;
                }
                Ok(true) => {
                    tracing::info!(instance = %id, "instance still exists after calling destroy")
                }
                Err(_) => {}
            }
            self.sleep_sync_interval().await;
        }
    }

    async fn sleep_sync_interval(&self) {
        let d = self.vms().sync_interval;
        tracing::info!(duration = ?d, "waiting SyncInterval");
        tokio::time::sleep(d).await;
    }
}

fn timed_out(what: &str, after: Duration) -> CloudError {
    cloud::cloud_error(
        CloudErrorKind::Transient,
        format!("cloud {what} call timed out after {after:?}"),
    )
}

/// Waits for a line (or the end) of standard input.
async fn pause_for_enter() {
    tracing::info!("waiting for operator to press Enter");
    eprint!("Press Enter to continue: ");
    let _ = tokio::task::spawn_blocking(|| {
        let mut byte = [0u8; 1];
        let mut stdin = std::io::stdin().lock();
        while let Ok(1) = stdin.read(&mut byte) {
            if byte[0] == b'\n' {
                break;
            }
        }
    })
    .await;
}

/// `n` random hex digits (n/2 bytes from the OS).
fn random_hex(n: usize) -> Result<String, SetupError> {
    let mut buf = vec![0u8; n / 2];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| SetupError::Random(format!("/dev/urandom: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_subnets_run_once_each() {
        let one = serde_json::json!({"SubnetID": "subnet-a"});
        assert_eq!(subnet_runs(&one), SubnetRuns::One);
        let single = serde_json::json!({"SubnetID": ["subnet-a"]});
        assert_eq!(subnet_runs(&single), SubnetRuns::One);
        assert_eq!(subnet_runs(&serde_json::json!({})), SubnetRuns::One);
        let two = serde_json::json!({"SubnetID": ["subnet-a", 7, "subnet-b"]});
        assert_eq!(
            subnet_runs(&two),
            SubnetRuns::Each(vec![Some("subnet-a".into()), None, Some("subnet-b".into())])
        );
        let set = serde_json::json!({"SubnetID": {"subnet-b": {}, "subnet-a": {}}});
        assert_eq!(
            subnet_runs(&set),
            SubnetRuns::Each(vec![Some("subnet-a".into()), Some("subnet-b".into())])
        );
    }

    #[test]
    fn logged_tags_hide_the_secret() {
        let tags = BTreeMap::from([
            ("ArvadosInstanceSecret".to_string(), "s3cr3t".to_string()),
            ("ArvadosInstanceSetID".to_string(), "zzzzz".to_string()),
        ]);
        let shown = ShownTags {
            tags: &tags,
            secret_key: "ArvadosInstanceSecret",
        }
        .to_string();
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(
            shown.contains("ArvadosInstanceSecret=\"<redacted>\""),
            "{shown}"
        );
        assert!(shown.contains("ArvadosInstanceSetID=\"zzzzz\""), "{shown}");
    }

    #[test]
    fn random_hex_has_the_length_asked() {
        let s = random_hex(40).expect("urandom");
        assert_eq!(s.len(), 40);
        assert!(s.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
