//! The simulated cloud and its VMs: instances with prices, latencies, quota, capacity and
//! rate-limit errors, boot and SSH readiness, broken nodes, spot reclaims, a lagging list, and
//! billing per instance-second from create to disappearance. Each VM runs a fake crunch-run with
//! the command-line semantics the dispatcher relies on (reference-workers.md §2.8).

use std::collections::BTreeMap;
use std::sync::Arc;

use arvados_dispatch_cloud::core::Timestamp;
use arvados_dispatch_cloud::core::command::{
    CapacityScope, CloudError, CloudErrorKind, ExecError, ExecErrorKind, ExecOutput,
};
use arvados_dispatch_cloud::core::key::Key;
use arvados_dispatch_cloud::core::rng::Rng;
use arvados_dispatch_cloud::core::time::millis;
use arvados_dispatch_cloud::core::types::{InstanceInfo, InstanceType};

use crate::dist::exponential;
use crate::scenario::CloudSpec;

/// Never.
pub const NEVER: u64 = u64::MAX / 4;

/// A fake crunch-run process.
#[derive(Clone, Debug)]
pub struct Proc {
    /// Distinguishes this process from an earlier one for the same container.
    pub token: u64,
    /// Exited (possibly still listed as stale).
    pub exited: bool,
    /// While exited, listed as stale until then.
    pub stale_until: u64,
    /// Ignores SIGTERM.
    pub ignore_term: bool,
}

/// An instance's crunch-run processes by container UUID, in UUID order.
///
/// An instance almost always has none or one, so they are kept in a sorted vector of
/// cache-line-aligned entries: a process is one line, where a B-tree leaf keeps its key and
/// its value lines apart (every remote command on the instance reads them, and by then they
/// are rarely cached).
#[derive(Clone, Debug, Default)]
pub struct Procs(Vec<ProcEntry>);

/// One container's process, in a cache line of its own.
#[derive(Clone, Debug)]
#[repr(align(64))]
struct ProcEntry {
    uuid: Key,
    proc: Proc,
}

impl Procs {
    fn position(&self, uuid: &Key) -> Result<usize, usize> {
        self.0.binary_search_by(|e| e.uuid.cmp(uuid))
    }

    /// The process for container `uuid`.
    pub fn get(&self, uuid: &Key) -> Option<&Proc> {
        self.position(uuid).ok().map(|i| &self.0[i].proc)
    }

    /// The process for container `uuid`, to change.
    pub fn get_mut(&mut self, uuid: &Key) -> Option<&mut Proc> {
        self.position(uuid).ok().map(|i| &mut self.0[i].proc)
    }

    /// Sets the process for container `uuid`, replacing any earlier one.
    pub fn insert(&mut self, uuid: Key, proc: Proc) {
        match self.position(&uuid) {
            Ok(i) => self.0[i].proc = proc,
            Err(i) => self.0.insert(i, ProcEntry { uuid, proc }),
        }
    }

    /// Forgets the process for container `uuid`.
    pub fn remove(&mut self, uuid: &Key) -> Option<Proc> {
        self.position(uuid).ok().map(|i| self.0.remove(i).proc)
    }

    /// Keeps the processes `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&Key, &Proc) -> bool) {
        self.0.retain(|e| keep(&e.uuid, &e.proc));
    }

    /// The containers whose processes have not exited, in UUID order.
    pub fn into_running(self) -> Vec<Key> {
        self.0
            .into_iter()
            .filter(|e| !e.proc.exited)
            .map(|e| e.uuid)
            .collect()
    }

    /// The processes, in UUID order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Proc)> {
        self.0.iter().map(|e| (&e.uuid, &e.proc))
    }
}

/// One simulated instance.
///
/// Laid out by hand: every remote command reads the readiness times, the flags and the
/// processes, and each listing reads the creation time, the list match and the record, of an
/// instance that is rarely still cached by then (there are up to thousands, and the core's
/// passes run in between). `repr(C)` keeps the fields in this order and the 64-byte alignment
/// (which the cloud's map nodes then have too) puts the first group in one cache line and the
/// second at the start of the next, so a command misses once on the instance instead of on
/// two or three lines; the assertion below the struct checks the first line's contents fit.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
pub struct Instance {
    // First cache line: what `exec` reads.
    /// SSH accepts connections from then.
    pub ssh_at: u64,
    /// The boot probe passes from then.
    pub boot_at: u64,
    /// Every command fails from then.
    pub broken_at: u64,
    /// `--list` says `broken` from then.
    pub report_broken_at: u64,
    /// crunch-run processes by container.
    pub procs: Procs,
    /// A first SSH connection was reported.
    pub ssh_reported: bool,
    /// crunch-run is not installed.
    pub crunch_run_missing: bool,
    /// The deployed runner binary is in place.
    pub runner_installed: bool,
    // Second cache line: what `Cloud::list` reads, then the rest.
    /// Billing starts (the create call returned).
    pub created_at: u64,
    /// Whether `info.tags` matched the list filter of generation `.0` (see `Cloud::list`); 0
    /// (no generation) until a list looks. Whoever changes `info.tags` resets it to
    /// [`Instance::UNLISTED`].
    pub list_match: (u64, bool),
    /// What List returns (shared with the listings, which copy only the pointer).
    pub info: Arc<InstanceInfo>,
    /// Configured type name.
    pub type_name: String,
    /// Hourly price.
    pub price: f64,
    /// VCPUs.
    pub vcpus: i64,
    /// Quota group.
    pub quota_group: String,
}

// `exec`'s fields end within the first cache line, the listing's begin the second.
const _: () = assert!(std::mem::offset_of!(Instance, created_at) == 64);

/// Billing totals.
#[derive(Clone, Debug, Default)]
pub struct Billing {
    /// Dollars.
    pub cost_usd: f64,
    /// Instance-seconds per type.
    pub seconds_by_type: BTreeMap<String, f64>,
    /// VCPU-seconds paid for.
    pub vcpu_seconds: f64,
}

/// The cloud.
#[derive(Debug)]
pub struct Cloud {
    spec: CloudSpec,
    /// Live instances, by ID (kept in the nodes, see [`Key`]: a lookup reads no other block).
    pub instances: BTreeMap<Key, Instance>,
    next_id: u64,
    last_create: Option<u64>,
    last_list: Option<u64>,
    /// Billing so far (closed intervals).
    pub billing: Billing,
    /// Instances created.
    pub created: usize,
    /// Most instances alive at once.
    pub peak: usize,
    /// Spot reclaims.
    pub reclaims: usize,
    /// The last list filter and its generation (from 1), for the instances' `list_match`.
    list_filter: Option<(BTreeMap<String, String>, u64)>,
}

impl Cloud {
    /// An empty cloud.
    pub fn new(spec: CloudSpec) -> Cloud {
        Cloud {
            spec,
            instances: BTreeMap::new(),
            next_id: 0,
            last_create: None,
            last_list: None,
            billing: Billing::default(),
            created: 0,
            peak: 0,
            reclaims: 0,
            list_filter: None,
        }
    }

    fn bill(&mut self, inst: &Instance, until: u64) {
        let secs = until.saturating_sub(inst.created_at) as f64 / 1000.0;
        self.billing.cost_usd += inst.price * secs / 3600.0;
        *self
            .billing
            .seconds_by_type
            .entry(inst.type_name.clone())
            .or_default() += secs;
        self.billing.vcpu_seconds += inst.vcpus as f64 * secs;
    }

    /// Cost including the instances still running at `now`.
    pub fn cost_at(&self, now: u64) -> Billing {
        let mut b = self.billing.clone();
        for i in self.instances.values() {
            let secs = now.saturating_sub(i.created_at) as f64 / 1000.0;
            b.cost_usd += i.price * secs / 3600.0;
            *b.seconds_by_type.entry(i.type_name.clone()).or_default() += secs;
            b.vcpu_seconds += i.vcpus as f64 * secs;
        }
        b
    }

    fn live_vcpus(&self, group: Option<&str>) -> i64 {
        self.instances
            .values()
            .filter(|i| group.is_none_or(|g| i.quota_group == g))
            .map(|i| i.vcpus)
            .sum()
    }

    /// A create call issued at `now` that returns at `done`. On success the instance exists
    /// (and bills) from `done`. Returns the result and, for a preemptible instance, when the
    /// cloud will reclaim it.
    pub fn create(
        &mut self,
        now: u64,
        done: u64,
        it: &InstanceType,
        tags: BTreeMap<String, String>,
        rng: &mut Rng,
    ) -> (Result<InstanceInfo, CloudError>, Option<u64>) {
        let fail = |kind, message: String| (Err(CloudError { kind, message }), None);
        let gap = millis(self.spec.min_time_between_creates.0);
        if let Some(last) = self.last_create
            && gap > 0
            && now < last + gap
        {
            return fail(
                CloudErrorKind::RateLimited {
                    retry_at: Timestamp(last + gap),
                },
                "RequestLimitExceeded: request rate exceeded".into(),
            );
        }
        self.last_create = Some(now);
        if rng.unit_f64() < self.spec.create_error_rate {
            return fail(
                CloudErrorKind::Transient,
                "InternalError: random create failure".into(),
            );
        }
        let q = &self.spec.quota;
        if q.max_instances.is_some_and(|m| self.instances.len() >= m) {
            return fail(
                CloudErrorKind::Quota,
                "InstanceLimitExceeded: instance quota reached".into(),
            );
        }
        if q.max_vcpus
            .is_some_and(|m| self.live_vcpus(None) + it.vcpus > m)
        {
            return fail(
                CloudErrorKind::Quota,
                "VcpuLimitExceeded: vCPU quota reached".into(),
            );
        }
        if let Some(m) = q.group_max_vcpus.get(&it.quota_group)
            && self.live_vcpus(Some(&it.quota_group)) + it.vcpus > *m
        {
            return fail(
                CloudErrorKind::Capacity(CapacityScope::QuotaGroup),
                format!(
                    "VcpuLimitExceeded: quota group {:?} vCPU limit reached",
                    it.quota_group
                ),
            );
        }
        for cap in &self.spec.capacity {
            if cap.window.is_some_and(|w| !w.contains(now)) {
                continue;
            }
            let by_type = cap
                .instance_type
                .as_ref()
                .is_some_and(|t| *t == it.name || *t == it.provider_type);
            let by_group = cap
                .quota_group
                .as_ref()
                .is_some_and(|g| *g == it.quota_group);
            if (by_type || by_group) && rng.unit_f64() < cap.probability {
                let scope = if by_group {
                    CapacityScope::QuotaGroup
                } else {
                    CapacityScope::InstanceType
                };
                return fail(
                    CloudErrorKind::Capacity(scope),
                    format!(
                        "InsufficientInstanceCapacity: no capacity for {}",
                        it.provider_type
                    ),
                );
            }
        }
        self.next_id += 1;
        let id = format!("i-{:08x}", self.next_id);
        let info = InstanceInfo {
            id: id.clone(),
            address: format!(
                "10.{}.{}.{}",
                (self.next_id >> 16) & 255,
                (self.next_id >> 8) & 255,
                self.next_id & 255
            ),
            provider_type: it.provider_type.clone(),
            tags,
            remote_user: "root".into(),
            ..InstanceInfo::default()
        };
        let ssh = millis(self.spec.ssh_ready.draw(rng));
        let boot = millis(self.spec.boot_time.draw(rng)).max(ssh);
        let doa = self.spec.dead_on_arrival.iter().any(|r| {
            r.window.is_none_or(|w| w.contains(now))
                && (r
                    .instance_type
                    .as_ref()
                    .is_some_and(|t| *t == it.name || *t == it.provider_type)
                    || r.quota_group.as_ref().is_some_and(|g| *g == it.quota_group))
                && rng.unit_f64() < r.probability
        });
        let never = rng.unit_f64() < self.spec.never_boot_rate || doa;
        let broken = rng.unit_f64() < self.spec.broken_rate;
        let broken_after = millis(self.spec.broken_after.draw(rng));
        let report_broken = rng.unit_f64() < self.spec.report_broken_rate;
        let report_after = millis(self.spec.broken_after.draw(rng));
        let crunch_run_missing = rng.unit_f64() < self.spec.crunch_run_missing_rate;
        let boot_at = if never { NEVER } else { done + boot };
        let inst = Instance {
            info: Arc::new(info.clone()),
            type_name: it.name.clone(),
            price: it.price,
            vcpus: it.vcpus,
            quota_group: it.quota_group.clone(),
            created_at: done,
            ssh_at: if never { NEVER } else { done + ssh },
            boot_at,
            broken_at: if broken {
                boot_at.saturating_add(broken_after)
            } else {
                NEVER
            },
            report_broken_at: if report_broken {
                boot_at.saturating_add(report_after)
            } else {
                NEVER
            },
            ssh_reported: false,
            crunch_run_missing,
            runner_installed: false,
            procs: Procs::default(),
            list_match: Instance::UNLISTED,
        };
        self.instances.insert(id.into(), inst);
        self.created += 1;
        self.peak = self.peak.max(self.instances.len());
        let reclaim = (it.preemptible && self.spec.spot_reclaims_per_hour > 0.0).then(|| {
            done + exponential(rng, 3_600_000.0 / self.spec.spot_reclaims_per_hour) as u64
        });
        (Ok(info), reclaim)
    }

    /// Removes an instance (destroy or reclaim); returns the containers whose crunch-run died.
    pub fn remove(&mut self, now: u64, id: &str) -> Vec<Key> {
        let Some(inst) = self.instances.remove(id) else {
            return Vec::new();
        };
        self.bill(&inst, now.max(inst.created_at));
        inst.procs.into_running()
    }

    /// A destroy call. `Ok(procs killed)` on success.
    pub fn destroy(&mut self, now: u64, id: &str, rng: &mut Rng) -> Result<Vec<Key>, CloudError> {
        if rng.unit_f64() < self.spec.destroy_error_rate {
            return Err(CloudError {
                kind: CloudErrorKind::Transient,
                message: "instance could not be destroyed".into(),
            });
        }
        if !self.instances.contains_key(id) {
            return Err(CloudError {
                kind: CloudErrorKind::NotFound,
                message: format!("InvalidInstanceID.NotFound: {id}"),
            });
        }
        Ok(self.remove(now, id))
    }

    /// A list call (with the configured lag and rate limit).
    pub fn list(
        &mut self,
        now: u64,
        filter: &BTreeMap<String, String>,
    ) -> Result<Vec<Arc<InstanceInfo>>, CloudError> {
        let gap = millis(self.spec.min_time_between_lists.0);
        if let Some(last) = self.last_list
            && gap > 0
            && now < last + gap
        {
            return Err(CloudError {
                kind: CloudErrorKind::RateLimited {
                    retry_at: Timestamp(last + gap),
                },
                message: "RequestLimitExceeded".into(),
            });
        }
        self.last_list = Some(now);
        let lag = millis(self.spec.list_lag.0);
        // Each instance remembers whether its tags matched the filter of the last generation
        // it was checked against; the dispatcher lists with the same filter every time, so
        // an instance's tags are read once per filter and change of tags, not once per list.
        let generation = match &self.list_filter {
            Some((f, g)) if f == filter => *g,
            last => {
                let g = last.as_ref().map_or(0, |(_, g)| *g) + 1;
                self.list_filter = Some((filter.clone(), g));
                g
            }
        };
        let mut listed = Vec::new();
        for i in self.instances.values_mut() {
            if i.created_at + lag > now {
                continue;
            }
            if i.list_match.0 != generation {
                let tags = &i.info.tags;
                let matched = filter.iter().all(|(k, v)| tags.get(k) == Some(v));
                i.list_match = (generation, matched);
            }
            if i.list_match.1 {
                listed.push(Arc::clone(&i.info));
            }
        }
        Ok(listed)
    }

    /// A set-tags call.
    pub fn set_tags(&mut self, id: &str, tags: BTreeMap<String, String>) -> Result<(), CloudError> {
        match self.instances.get_mut(id) {
            Some(i) => {
                Arc::make_mut(&mut i.info).tags = tags;
                i.list_match = Instance::UNLISTED;
                Ok(())
            }
            None => Err(CloudError {
                kind: CloudErrorKind::NotFound,
                message: format!("InvalidInstanceID.NotFound: {id}"),
            }),
        }
    }
}

/// What a remote command did, besides its output.
#[derive(Debug, Default)]
pub struct ExecEffects {
    /// The first SSH connection to this instance happened.
    pub ssh_connected: bool,
    /// A crunch-run process was started for this container (with this token).
    pub started: Option<(Key, u64)>,
    /// A crunch-run process exited on SIGTERM.
    pub killed: Option<Key>,
}

fn exec_err(kind: ExecErrorKind, stderr: &str) -> Result<ExecOutput, ExecError> {
    Err(ExecError {
        message: format!("remote command failed: {stderr}"),
        kind,
        stdout: String::new(),
        stderr: stderr.to_string(),
    })
}

impl Instance {
    /// `list_match` before any list has checked the instance's current tags.
    pub const UNLISTED: (u64, bool) = (0, false);

    /// Runs one remote command at `now` (the wire strings of reference-workers.md §2).
    pub fn exec(
        &mut self,
        now: u64,
        command: &str,
        token: u64,
        ignore_term: bool,
    ) -> (Result<ExecOutput, ExecError>, ExecEffects) {
        let mut fx = ExecEffects::default();
        if now < self.ssh_at {
            return (exec_err(ExecErrorKind::Connect, "connection refused"), fx);
        }
        if !self.ssh_reported {
            self.ssh_reported = true;
            fx.ssh_connected = true;
        }
        if now >= self.broken_at {
            return (exec_err(ExecErrorKind::Exit(2), "cannot fork"), fx);
        }
        let cmd = command.strip_prefix("sudo ").unwrap_or(command);
        if let Some(path) = cmd.strip_prefix("md5sum ") {
            return if self.runner_installed {
                let md5 = path.rsplit_once('~').map(|(_, m)| m).unwrap_or("");
                (
                    Ok(ExecOutput {
                        stdout: format!("{md5}  {path}\n"),
                        stderr: String::new(),
                    }),
                    fx,
                )
            } else {
                (
                    exec_err(
                        ExecErrorKind::Exit(1),
                        &format!("md5sum: {path}: No such file or directory"),
                    ),
                    fx,
                )
            };
        }
        if cmd.starts_with("set -e; dstdir=") || cmd.starts_with("sh -c 'set -e; dstdir=") {
            self.runner_installed = true;
            return (Ok(ExecOutput::default()), fx);
        }
        let mut words = cmd.split(' ');
        let prog = words.next().unwrap_or("");
        if !prog.contains("crunch-run") {
            // The boot probe.
            return if now >= self.boot_at {
                (Ok(ExecOutput::default()), fx)
            } else {
                (
                    exec_err(ExecErrorKind::Exit(1), "System is booting up."),
                    fx,
                )
            };
        }
        if now < self.boot_at || self.crunch_run_missing {
            return (
                exec_err(ExecErrorKind::Exit(127), "crunch-run: command not found"),
                fx,
            );
        }
        match words.next() {
            Some("--list") => {
                let mut out = String::new();
                let mut expired = false;
                for (u, p) in self.procs.iter() {
                    if !p.exited {
                        out.push_str(u);
                        out.push('\n');
                    } else if p.stale_until > now {
                        out.push_str(u);
                        out.push_str(" stale\n");
                    } else {
                        expired = true;
                    }
                }
                if expired {
                    self.gc(now);
                }
                if now >= self.report_broken_at {
                    out.push_str("broken\n");
                }
                (
                    Ok(ExecOutput {
                        stdout: out,
                        stderr: String::new(),
                    }),
                    fx,
                )
            }
            Some("--detach") => {
                let uuid = cmd.rsplit(' ').next().unwrap_or("").trim_matches('\'');
                let key = Key::new(uuid);
                if let Some(p) = self.procs.get(&key)
                    && (!p.exited || p.stale_until > now)
                {
                    return (
                        exec_err(
                            ExecErrorKind::Exit(1),
                            "container is already running (lock held)",
                        ),
                        fx,
                    );
                }
                self.procs.insert(
                    key.clone(),
                    Proc {
                        token,
                        exited: false,
                        stale_until: 0,
                        ignore_term,
                    },
                );
                fx.started = Some((key, token));
                let out = format!("{{\"UUID\":\"{uuid}\",\"PID\":{token}}}\n");
                (
                    Ok(ExecOutput {
                        stdout: out,
                        stderr: String::new(),
                    }),
                    fx,
                )
            }
            Some("--kill") => {
                let uuid = Key::new(cmd.rsplit(' ').next().unwrap_or(""));
                match self.procs.get_mut(&uuid) {
                    Some(p) if !p.exited => {
                        if p.ignore_term {
                            (
                                exec_err(
                                    ExecErrorKind::Exit(1),
                                    "sent signal 15 but process is still alive",
                                ),
                                fx,
                            )
                        } else {
                            p.exited = true;
                            p.stale_until = 0;
                            fx.killed = Some(uuid);
                            (Ok(ExecOutput::default()), fx)
                        }
                    }
                    _ => (Ok(ExecOutput::default()), fx),
                }
            }
            _ => (exec_err(ExecErrorKind::Exit(2), "usage: crunch-run"), fx),
        }
    }

    /// Ends a process (payload done or crashed) unless a later one replaced it. Returns whether
    /// it was this process.
    pub fn exit_proc(&mut self, uuid: &Key, token: u64, stale_until: u64) -> bool {
        match self.procs.get_mut(uuid) {
            Some(p) if p.token == token && !p.exited => {
                p.exited = true;
                p.stale_until = stale_until;
                if stale_until == 0 {
                    self.procs.remove(uuid);
                }
                true
            }
            _ => false,
        }
    }

    /// Drops stale entries whose time has passed. Only memory depends on when this runs:
    /// every reader of `procs` skips an exited process whose stale time has passed, so
    /// `--list` collects them as it meets them instead of every command walking the map.
    pub fn gc(&mut self, now: u64) {
        self.procs.retain(|_, p| !p.exited || p.stale_until > now);
    }
}
