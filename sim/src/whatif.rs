//! `dispatch-sim whatif`: fork a dispatcher's snapshot into the simulator and compare how the
//! queue, the waits and the cost would evolve with and without config changes.
//!
//! A snapshot (`arvados_dispatch_cloud::core::snapshot`, docs/pricing.md "What-if") comes from
//! a live dispatcher's management API (`--from http://host:port`) or a file (`--from FILE`,
//! also written by `dispatch-sim run --snapshot-at`). The fork is planned once from the
//! snapshot and the seed: each container's run time (drawn from the observed run times of its
//! class), the instances to put in the simulated cloud, and the future arrivals (a Poisson
//! process per observed class). Two worlds then run the same plan for `--hours`: the baseline
//! with the snapshot's config and one with the `--change`s applied (the sweep's knob names, or
//! any cluster config key path). Each world starts with the snapshot's instances in the cloud,
//! tagged as this dispatcher's, and the snapshot's containers in the controller (running ones
//! with crunch-run on their instances), so its dispatcher recovers them as after a restart.
//!
//! Everything is a pure function of (snapshot, options): the same inputs give byte-identical
//! outputs. The outputs hold no wall-clock time.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use arvados_dispatch_cloud::config::Loaded;
use arvados_dispatch_cloud::core::key::Key;
use arvados_dispatch_cloud::core::rng::Rng;
use arvados_dispatch_cloud::core::snapshot::{self, ClassStats, SnapContainer, Snapshot};
use arvados_dispatch_cloud::core::time::millis;
use arvados_dispatch_cloud::core::types::{Container, ContainerState, InstanceInfo};
use serde::Serialize;
use serde_yaml::{Mapping, Value};

use crate::cloud::{Instance, NEVER, Proc, Procs};
use crate::dist::Dur;
use crate::scenario::{Expect, Scenario, TuningSpec, WorkloadSpec};
use crate::sweep::{Series, Tracker, TrackerWriter, apply_knob};
use crate::workload::Submission;
use crate::world::{INSTANCE_SET_ID, World, WorldError};

/// The management API path of the snapshot.
pub const SNAPSHOT_PATH: &str = "/arvados/v1/dispatch/snapshot";

/// The run time of a container when nothing was observed: no run time of its class, of its
/// instance type or of any container.
pub const DEFAULT_RUNTIME: Duration = Duration::from_secs(600);

/// The longest what-if horizon, hours.
pub const HOURS_MAX: f64 = 24.0 * 365.0;

/// The largest snapshot read, bytes.
pub const SNAPSHOT_BYTES_MAX: u64 = 1 << 30;

/// How long a fetch may take to connect, and then to send or receive.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Timeline points per hour in the JSON and the chart.
const POINTS_PER_HOUR: u64 = 4;

/// Why a what-if could not run.
#[derive(Debug, thiserror::Error)]
pub enum WhatifError {
    /// The snapshot file could not be read.
    #[error("cannot read snapshot {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The snapshot could not be fetched.
    #[error("cannot fetch the snapshot from {url}: {message}")]
    Fetch {
        /// The URL (without user information or query).
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The snapshot is not valid.
    #[error("snapshot {origin}: {message}")]
    Snapshot {
        /// Where it came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A `--change` is not valid.
    #[error("--change {change}: {message}")]
    Change {
        /// The change as given.
        change: String,
        /// What is wrong.
        message: String,
    },
    /// An option is not valid.
    #[error("{option} {value}: {message}")]
    Option {
        /// The option.
        option: String,
        /// Its value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// A simulation could not start.
    #[error("{0}")]
    Run(String),
    /// An output could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// One `--change KEY=VALUE`.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// A sweep knob name (`MaxInstances`) or a cluster config key path
    /// (`Containers.CloudVMs.TimeoutIdle`, `InstanceTypes.m5.large.Price`).
    pub key: String,
    /// The value, read as YAML (`200`, `5m`, `true`).
    pub value: Value,
    /// As given.
    pub text: String,
}

impl Change {
    /// Parses `KEY=VALUE`.
    pub fn parse(s: &str) -> Result<Change, WhatifError> {
        let bad = |message: &str| WhatifError::Change {
            change: s.to_string(),
            message: message.to_string(),
        };
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE, such as MaxInstances=200"))?;
        let key = k.trim();
        if key.is_empty() {
            return Err(bad("the key is empty"));
        }
        if key.split('.').any(str::is_empty) {
            return Err(bad("the key path has an empty part"));
        }
        let v = v.trim();
        if v.is_empty() {
            return Err(bad("the value is empty"));
        }
        let value: Value = serde_yaml::from_str(v)
            .map_err(|e| bad(&format!("the value {v:?} is not a YAML scalar: {e}")))?;
        if !matches!(value, Value::Bool(_) | Value::Number(_) | Value::String(_)) {
            return Err(bad(&format!(
                "the value {v:?} is not a single number, string or boolean"
            )));
        }
        Ok(Change {
            key: key.to_string(),
            value,
            text: s.to_string(),
        })
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Simulated hours after the snapshot.
    pub hours: f64,
    /// Root seed of the plan and of both worlds.
    pub seed: u64,
    /// The changes of the second run.
    pub changes: Vec<Change>,
    /// Cloud, controller and VM models (and tuning) from this scenario instead of the
    /// simulator's defaults.
    pub models: Option<Scenario>,
}

// ----- reading a snapshot -------------------------------------------------------------------

/// How `--from` is shown in messages and outputs: a URL without user information, query or
/// fragment (which could hold a token), or the file name as given.
pub fn source_name(from: &str) -> String {
    if from.starts_with("http://") || from.starts_with("https://") {
        shown_url(from)
    } else {
        from.to_string()
    }
}

/// `url` without user information, query or fragment, for messages.
fn shown_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit('@').next().unwrap_or_default();
    format!("{scheme}://{host}{path}")
}

/// Reads a snapshot from a file or an `http://` URL (`token` is sent as a bearer token).
pub fn load_snapshot(from: &str, token: Option<&str>) -> Result<Snapshot, WhatifError> {
    let (text, origin) = if from.starts_with("http://") || from.starts_with("https://") {
        (fetch(from, token)?, shown_url(from))
    } else {
        (read_file(Path::new(from))?, from.to_string())
    };
    parse_snapshot(&text, &origin)
}

#[allow(clippy::disallowed_methods)]
fn read_file(path: &Path) -> Result<String, WhatifError> {
    let read_err = |source| WhatifError::Read {
        path: path.display().to_string(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read_err)?;
    let mut text = String::new();
    f.take(SNAPSHOT_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > SNAPSHOT_BYTES_MAX {
        return Err(WhatifError::Snapshot {
            origin: path.display().to_string(),
            message: format!("larger than {SNAPSHOT_BYTES_MAX} bytes"),
        });
    }
    Ok(text)
}

/// Parses and checks snapshot text.
pub fn parse_snapshot(text: &str, origin: &str) -> Result<Snapshot, WhatifError> {
    let bad = |message: String| WhatifError::Snapshot {
        origin: origin.to_string(),
        message,
    };
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let format = v.get("format").and_then(serde_json::Value::as_str);
    if format != Some(snapshot::FORMAT) {
        return Err(bad(format!(
            "format is {}, expected {:?}",
            format.map_or_else(|| "missing".to_string(), |f| format!("{f:?}")),
            snapshot::FORMAT
        )));
    }
    let version = v.get("version").and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(snapshot::VERSION)) {
        return Err(bad(format!(
            "version {}, this dispatch-sim reads version {}",
            version.map_or_else(|| "missing".to_string(), |n| n.to_string()),
            snapshot::VERSION
        )));
    }
    let s: Snapshot = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
    if s.config
        .get("Clusters")
        .is_none_or(|c| c.get(&s.cluster_id).is_none())
    {
        return Err(bad(format!(
            "config has no Clusters.{} mapping",
            s.cluster_id
        )));
    }
    Ok(s)
}

/// A GET over plain HTTP/1.1 (the management API is served without TLS; behind a TLS proxy,
/// fetch it with curl and pass the file). A tiny blocking client: no connection reuse, a
/// bounded response, `Content-Length` or chunked bodies.
#[allow(clippy::disallowed_methods)]
fn fetch(url: &str, token: Option<&str>) -> Result<String, WhatifError> {
    let fail = |message: String| WhatifError::Fetch {
        url: shown_url(url),
        message,
    };
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(fail(
            "only http:// URLs can be fetched; fetch an https:// snapshot with curl and pass the file"
                .into(),
        ));
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err(fail(
            "user information in the URL is not supported: give the token with --token or ARVADOS_API_TOKEN"
                .into(),
        ));
    }
    if authority.is_empty() {
        return Err(fail("no host in the URL".into()));
    }
    let path = path.split('#').next().unwrap_or_default();
    let path = if path.is_empty() || path == "/" {
        SNAPSHOT_PATH.to_string()
    } else {
        path.to_string()
    };
    let host_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.contains(']'))
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    use std::net::{TcpStream, ToSocketAddrs};
    let addrs: Vec<_> = host_port
        .to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve {authority}: {e}")))?
        .collect();
    let mut last = None;
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = stream.ok_or_else(|| {
        fail(format!(
            "cannot connect to {authority}: {}",
            last.map_or_else(|| "no address".to_string(), |e| e.to_string())
        ))
    })?;
    let io = |e: std::io::Error| fail(e.to_string());
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\nUser-Agent: dispatch-sim\r\nConnection: close\r\n"
    );
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        req.push_str("Authorization: Bearer ");
        req.push_str(t);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    stream
        .take(SNAPSHOT_BYTES_MAX + 65_536)
        .read_to_end(&mut raw)
        .map_err(io)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| fail("the response has no end of headers".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| fail(format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    if chunked {
        body = dechunk(&body).ok_or_else(|| fail("malformed chunked body".into()))?;
    } else if let Some(n) = length {
        if body.len() < n {
            return Err(fail(format!(
                "the body ended after {} of {n} bytes",
                body.len()
            )));
        }
        body.truncate(n);
    }
    let text = String::from_utf8(body).map_err(|_| fail("the body is not UTF-8".into()))?;
    match status {
        200 => Ok(text),
        401 | 403 => Err(fail(format!(
            "HTTP {status} {}: give the cluster's ManagementToken with --token or ARVADOS_API_TOKEN",
            text.trim()
        ))),
        _ => Err(fail(format!(
            "HTTP {status}: {}",
            text.trim().chars().take(300).collect::<String>()
        ))),
    }
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..nl]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[nl + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

// ----- configs ------------------------------------------------------------------------------

/// The snapshot's config as YAML, and the cluster ID.
fn base_config(s: &Snapshot) -> Result<Value, WhatifError> {
    serde_yaml::to_value(&s.config).map_err(|e| WhatifError::Snapshot {
        origin: "config".into(),
        message: e.to_string(),
    })
}

fn load(config: &Value) -> Result<Loaded, String> {
    let text = serde_yaml::to_string(config).map_err(|e| e.to_string())?;
    arvados_dispatch_cloud::config::load_str(&text, "config").map_err(|e| e.to_string())
}

/// Applies one change to the cluster mapping.
fn apply_change(cluster: &mut Mapping, c: &Change) -> Result<(), String> {
    if c.key == "InstanceTypes" {
        return Err(
            "whatif cannot replace the whole catalogue; change one type's field with InstanceTypes.<name>.<field>, such as InstanceTypes.m5.large.Price=0.1"
                .into(),
        );
    }
    if let Some(rest) = c.key.strip_prefix("InstanceTypes.") {
        // Type names may hold dots (m5.large): the field is the last part.
        let Some((name, field)) = rest.rsplit_once('.') else {
            return Err("expected InstanceTypes.<name>.<field>".into());
        };
        let types = cluster
            .get_mut("InstanceTypes")
            .and_then(Value::as_mapping_mut)
            .ok_or("the config has no InstanceTypes")?;
        let Some(t) = types.get_mut(name).and_then(Value::as_mapping_mut) else {
            let known: Vec<&str> = types.keys().filter_map(Value::as_str).collect();
            return Err(format!(
                "no instance type {name:?} (configured: {})",
                known.join(", ")
            ));
        };
        t.insert(Value::String(field.to_string()), c.value.clone());
        return Ok(());
    }
    apply_knob(cluster, &c.key, &c.value, &BTreeMap::new()).map_err(|e| match e {
        crate::sweep::SweepError::Knob { message, .. } => message,
        other => other.to_string(),
    })
}

/// The baseline and the changed config, loaded; `notes` gets changes that change nothing.
fn configs(
    s: &Snapshot,
    changes: &[Change],
    notes: &mut Vec<String>,
) -> Result<(Value, Loaded, Value, Loaded), WhatifError> {
    let base = base_config(s)?;
    let base_loaded = load(&base).map_err(|message| WhatifError::Snapshot {
        origin: "config".into(),
        message,
    })?;
    let mut changed = base.clone();
    let mut before = base_loaded.clone();
    for c in changes {
        let err = |message: String| WhatifError::Change {
            change: c.text.clone(),
            message,
        };
        let cluster = changed
            .get_mut("Clusters")
            .and_then(|m| m.get_mut(s.cluster_id.as_str()))
            .and_then(Value::as_mapping_mut)
            .ok_or_else(|| err("the snapshot's config has no cluster mapping".into()))?;
        apply_change(cluster, c).map_err(err)?;
        let after = load(&changed).map_err(err)?;
        for w in &after.warnings {
            if !before.warnings.contains(w) && !w.contains("it is used as") {
                return Err(err(w.clone()));
            }
        }
        if after.core == before.core {
            notes.push(format!(
                "--change {} changes nothing the dispatcher uses",
                c.text
            ));
        }
        before = after;
    }
    Ok((base, base_loaded, changed, before))
}

// ----- the plan -----------------------------------------------------------------------------

type ClassKey = (String, i64, i64, i64, i64, String, bool, bool);

fn key_of(
    instance_type: &str,
    rc: &arvados_dispatch_cloud::core::types::RuntimeConstraints,
    scratch: i64,
    preemptible: bool,
    supervisor: bool,
) -> ClassKey {
    let g = &rc.gpu;
    (
        instance_type.to_string(),
        rc.vcpus,
        rc.ram,
        rc.keep_cache_ram,
        scratch,
        format!(
            "{}/{}/{}/{}/{}",
            g.stack,
            g.device_count,
            g.driver_version,
            g.hardware_target.join(","),
            g.vram
        ),
        preemptible,
        supervisor,
    )
}

/// Run-time samples by class, by instance type and overall (milliseconds).
#[derive(Default)]
struct Runtimes {
    by_class: BTreeMap<ClassKey, Vec<u64>>,
    by_type: BTreeMap<String, Vec<u64>>,
    all: Vec<u64>,
}

impl Runtimes {
    fn new(classes: &[ClassStats]) -> Runtimes {
        let mut r = Runtimes::default();
        for c in classes {
            let ms: Vec<u64> = c
                .runtime_seconds
                .iter()
                .map(|s| (s * 1000.0).round().max(0.0) as u64)
                .collect();
            if ms.is_empty() {
                continue;
            }
            r.by_class
                .entry(key_of(
                    &c.instance_type,
                    &c.runtime_constraints,
                    c.scratch,
                    c.preemptible,
                    c.supervisor,
                ))
                .or_default()
                .extend(&ms);
            r.by_type
                .entry(c.instance_type.clone())
                .or_default()
                .extend(&ms);
            r.all.extend(&ms);
        }
        for v in r.by_class.values_mut().chain(r.by_type.values_mut()) {
            v.sort_unstable();
        }
        r.all.sort_unstable();
        r
    }

    fn samples(&self, key: &ClassKey) -> &[u64] {
        if let Some(v) = self.by_class.get(key) {
            return v;
        }
        if let Some(v) = self.by_type.get(&key.0) {
            return v;
        }
        &self.all
    }

    /// A run time for a container of this class.
    fn draw(&self, key: &ClassKey, rng: &mut Rng) -> u64 {
        let s = self.samples(key);
        if s.is_empty() {
            return millis(DEFAULT_RUNTIME);
        }
        s[rng.below(s.len() as u64) as usize]
    }

    /// The time left for a container of this class that has run `elapsed` ms: a run time
    /// drawn among the observed ones longer than `elapsed`, minus `elapsed`; if none is longer,
    /// another tenth of `elapsed`, at least a minute.
    fn remaining(&self, key: &ClassKey, elapsed: u64, rng: &mut Rng) -> u64 {
        let s = self.samples(key);
        let longer: Vec<u64> = if s.is_empty() {
            [millis(DEFAULT_RUNTIME)]
                .into_iter()
                .filter(|t| *t > elapsed)
                .collect()
        } else {
            s.iter().copied().filter(|t| *t > elapsed).collect()
        };
        if longer.is_empty() {
            return (elapsed / 10).max(60_000);
        }
        longer[rng.below(longer.len() as u64) as usize] - elapsed
    }
}

/// A container of the snapshot, as the fork puts it in the controller.
#[derive(Clone, Debug)]
struct Forked {
    container: Container,
    /// Runs on this (forked) instance with this much left; else queued.
    running_on: Option<(String, u64)>,
    /// Its run time when it starts (queued), or what is left (running).
    runtime_ms: u64,
    /// Seconds it had waited at the snapshot (queued ones).
    prior_wait_s: f64,
}

/// An instance of the snapshot, as the fork puts it in the cloud.
#[derive(Clone, Debug)]
struct ForkedInstance {
    id: String,
    original: String,
    type_name: String,
    provider_type: String,
    price: f64,
    idle_behavior: String,
    /// Still booting at the snapshot: ready after this many ms.
    boot_in: Option<u64>,
    secret: String,
}

/// Everything both runs share.
#[derive(Clone, Debug)]
struct Plan {
    containers: Vec<Forked>,
    instances: Vec<ForkedInstance>,
    /// (class index, arrival ms, run time ms), sorted by time.
    arrivals: Vec<(usize, u64, u64)>,
    notes: Vec<String>,
}

fn fork_container(c: &SnapContainer) -> Container {
    let mut k = Container {
        uuid: c.uuid.as_str().into(),
        priority: c.priority,
        runtime_constraints: c.runtime_constraints.clone(),
        scheduling_parameters: c.scheduling_parameters.clone(),
        ..Container::default()
    };
    // The simulated controller serves no mounts and no image: the scratch the dispatcher
    // computed (tmp mounts, image, keep cache) becomes the keep cache on disk.
    k.runtime_constraints.keep_cache_disk = c.needs.scratch;
    k
}

fn plan(s: &Snapshot, opts: &Options) -> Plan {
    let mut notes = Vec::new();
    let runtimes = Runtimes::new(&s.arrivals.classes);
    let mut rng = Rng::derive(opts.seed, "whatif-runtimes");
    let mut boot_rng = Rng::derive(opts.seed, "whatif-instances");
    let cloud = opts
        .models
        .as_ref()
        .map(|m| m.cloud.clone())
        .unwrap_or_default();
    let mut instances = Vec::new();
    let mut shutdown = 0;
    for i in &s.instances {
        if i.state == "shutdown" {
            shutdown += 1;
            continue;
        }
        let boot_in = (i.state == "booting").then(|| {
            let boot = millis(cloud.boot_time.draw(&mut boot_rng));
            boot.saturating_sub(s.taken_at_ms.saturating_sub(i.appeared_at_ms))
        });
        instances.push(ForkedInstance {
            id: format!("fork-{}", i.id),
            original: i.id.clone(),
            type_name: i.instance_type.clone(),
            provider_type: i.provider_type.clone(),
            price: i.price,
            idle_behavior: i.idle_behavior.clone(),
            boot_in,
            secret: boot_rng.hex(20),
        });
    }
    if shutdown > 0 {
        notes.push(format!(
            "{shutdown} instances shutting down at the snapshot were left out"
        ));
    }
    let forked_id: BTreeMap<&str, &str> = instances
        .iter()
        .map(|i| (i.original.as_str(), i.id.as_str()))
        .collect();
    let mut containers = Vec::new();
    let (mut lost, mut zero) = (0, 0);
    for c in &s.containers {
        let key = key_of(
            &c.instance_type,
            &c.runtime_constraints,
            c.needs.scratch,
            c.scheduling_parameters.preemptible,
            c.scheduling_parameters.supervisor,
        );
        let on = c
            .instance
            .as_deref()
            .and_then(|i| forked_id.get(i))
            .map(|i| i.to_string());
        let (running_on, runtime_ms, prior_wait_s) = match (c.state, on) {
            (ContainerState::Complete | ContainerState::Cancelled, _) => continue,
            (ContainerState::Running | ContainerState::Locked, Some(inst)) => {
                let since = c.running_since_ms.unwrap_or(c.first_seen_at_ms);
                let elapsed = s.taken_at_ms.saturating_sub(since);
                let left = runtimes.remaining(&key, elapsed, &mut rng);
                (Some((inst, left)), left, 0.0)
            }
            (ContainerState::Running, None) => {
                lost += 1;
                continue;
            }
            (ContainerState::Queued, _) | (ContainerState::Locked, None) => {
                if c.priority <= 0 {
                    zero += 1;
                    continue;
                }
                (None, runtimes.draw(&key, &mut rng), c.age_seconds)
            }
        };
        containers.push(Forked {
            container: fork_container(c),
            running_on,
            runtime_ms,
            prior_wait_s,
        });
    }
    if lost > 0 {
        notes.push(format!(
            "{lost} running containers on instances the dispatcher did not know were left out"
        ));
    }
    if zero > 0 {
        notes.push(format!(
            "{zero} queued containers with priority 0 (being cancelled) were left out"
        ));
    }
    // Future arrivals: a Poisson process per class, at its observed rate.
    let horizon = opts.hours * 3_600_000.0;
    let mut arrivals = Vec::new();
    let mut arr_rng = Rng::derive(opts.seed, "whatif-arrivals");
    for (k, c) in s.arrivals.classes.iter().enumerate() {
        if c.per_hour <= 0.0 || !c.per_hour.is_finite() {
            continue;
        }
        let key = key_of(
            &c.instance_type,
            &c.runtime_constraints,
            c.scratch,
            c.preemptible,
            c.supervisor,
        );
        let mean = 3_600_000.0 / c.per_hour;
        let mut t = crate::dist::exponential(&mut arr_rng, mean);
        while t < horizon {
            arrivals.push((k, t as u64, runtimes.draw(&key, &mut rng)));
            t += crate::dist::exponential(&mut arr_rng, mean);
        }
    }
    arrivals.sort_by_key(|a| (a.1, a.0));
    if s.arrivals.total == 0 {
        notes.push(if s.arrivals.observed_seconds > 0.0 {
            format!(
                "no arrival in the {:.0} s observed before the snapshot: no future arrivals are simulated",
                s.arrivals.observed_seconds
            )
        } else {
            "no arrival history (the dispatcher had just started): no future arrivals are simulated"
                .to_string()
        });
    }
    if s.arrivals.runtimes_observed == 0 {
        notes.push(format!(
            "no run time observed: every container runs {} s",
            DEFAULT_RUNTIME.as_secs()
        ));
    }
    Plan {
        containers,
        instances,
        arrivals,
        notes,
    }
}

// ----- running --------------------------------------------------------------------------------

/// Per-container facts of a finished run that the statistics need.
struct Row {
    created_at: u64,
    running_at: Option<u64>,
    ended_at: Option<u64>,
    state: ContainerState,
    forked_running: bool,
    prior_wait_s: f64,
}

/// The results of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Variant {
    /// `baseline` or `changed`.
    pub label: String,
    /// The changes applied (none for the baseline).
    pub changes: Vec<String>,
    /// Dollars billed over the horizon (configured prices).
    pub cost_usd: f64,
    /// Instance-hours over the horizon.
    pub instance_hours: f64,
    /// Instance-hours by type.
    pub instance_hours_by_type: BTreeMap<String, f64>,
    /// Containers that completed during the horizon.
    pub completed: usize,
    /// Containers cancelled during the horizon.
    pub cancelled: usize,
    /// Cancellations by reason.
    pub cancel_reasons: BTreeMap<String, usize>,
    /// Containers whose payload started during the horizon.
    pub started: usize,
    /// Wait from submission to start of those, seconds (including the wait before the
    /// snapshot): median.
    pub wait_p50_s: f64,
    /// 95th percentile.
    pub wait_p95_s: f64,
    /// Longest.
    pub wait_max_s: f64,
    /// Containers still waiting at the end.
    pub waiting_at_end: usize,
    /// Longest wait of those so far, seconds.
    pub longest_waiting_at_end_s: f64,
    /// Containers running at the end.
    pub running_at_end: usize,
    /// Instances created during the horizon.
    pub instances_created: usize,
    /// Most instances alive at once.
    pub instances_peak: i64,
    /// Core and ground-truth invariant violations (0 unless something is wrong).
    pub invariant_violations: usize,
    /// Event-log hash (FNV-1a 64): the same inputs give the same hash.
    pub event_log_hash: String,
    /// Queue length, running containers and instances over time.
    pub timeline: Vec<Point>,
    /// Instance counts by type over time.
    #[serde(skip)]
    pub series: Series,
}

/// One point of a timeline.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Hours after the snapshot.
    pub hour: f64,
    /// Containers waiting to start (queued, or locked and starting).
    pub queued: usize,
    /// Containers running.
    pub running: usize,
    /// Instances alive.
    pub instances: i64,
}

/// Differences, changed minus baseline.
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    /// Dollars.
    pub cost_usd: f64,
    /// Percent of the baseline's cost (0 when the baseline cost nothing).
    pub cost_percent: f64,
    /// Instance-hours.
    pub instance_hours: f64,
    /// Completed.
    pub completed: i64,
    /// Started.
    pub started: i64,
    /// Median wait, seconds.
    pub wait_p50_s: f64,
    /// 95th percentile wait, seconds.
    pub wait_p95_s: f64,
    /// Longest wait, seconds.
    pub wait_max_s: f64,
    /// Waiting at the end.
    pub waiting_at_end: i64,
}

/// What the snapshot held.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotSummary {
    /// Where it came from.
    pub source: String,
    /// Cluster ID.
    pub cluster_id: String,
    /// `taken_at_ms`.
    pub taken_at_ms: u64,
    /// Containers forked as queued.
    pub queued: usize,
    /// Containers forked as running.
    pub running: usize,
    /// Instances forked.
    pub instances: usize,
    /// Observed arrivals per hour.
    pub arrivals_per_hour: f64,
    /// Over this many observed seconds.
    pub arrivals_observed_seconds: f64,
    /// Run times observed.
    pub runtimes_observed: usize,
    /// Future arrivals simulated.
    pub arrivals_simulated: usize,
}

/// A what-if's results.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// The snapshot.
    pub snapshot: SnapshotSummary,
    /// Hours simulated.
    pub hours: f64,
    /// Seed.
    pub seed: u64,
    /// The changes, as given.
    pub changes: Vec<String>,
    /// Without the changes.
    pub baseline: Variant,
    /// With them.
    pub changed: Variant,
    /// Changed minus baseline.
    pub difference: Difference,
    /// What the fork left out or assumed.
    pub notes: Vec<String>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn scenario_for(label: &str, config: Value, opts: &Options, dur: Duration) -> Scenario {
    let m = opts.models.as_ref();
    Scenario {
        name: format!("whatif-{label}"),
        description: String::new(),
        seed: opts.seed,
        duration: Dur(dur),
        config,
        tuning: m.map(|m| m.tuning.clone()).unwrap_or(TuningSpec {
            schedule_min_interval: None,
        }),
        cloud: m.map(|m| m.cloud.clone()).unwrap_or_default(),
        controller: m.map(|m| m.controller.clone()).unwrap_or_default(),
        vms: m.map(|m| m.vms.clone()).unwrap_or_default(),
        workload: WorkloadSpec::default(),
        restarts: Vec::new(),
        // Never stop before the horizon (instances on hold keep billing).
        settle: Dur(dur),
        check_every: 1,
        expect: Expect::default(),
    }
}

/// Sets up the fork in a fresh world.
fn prepare(w: &mut World, p: &Plan, arrivals: &[Submission]) -> Result<(), WorldError> {
    let prefix = w.loaded.core.cloud_vms.tag_key_prefix.clone();
    let resource_tags = w.loaded.core.cloud_vms.resource_tags.clone();
    for (n, fi) in p.instances.iter().enumerate() {
        let mut tags = resource_tags.clone();
        tags.insert(format!("{prefix}InstanceSetID"), INSTANCE_SET_ID.into());
        tags.insert(format!("{prefix}InstanceType"), fi.type_name.clone());
        tags.insert(format!("{prefix}IdleBehavior"), fi.idle_behavior.clone());
        tags.insert(format!("{prefix}InstanceSecret"), fi.secret.clone());
        let it = w.loaded.core.instance_types.get(&fi.type_name);
        let n = n + 1;
        let ready = fi.boot_in.unwrap_or(0);
        w.cloud.instances.insert(
            fi.id.as_str().into(),
            Instance {
                info: InstanceInfo {
                    id: fi.id.clone(),
                    address: format!("10.255.{}.{}", (n >> 8) & 255, n & 255),
                    provider_type: fi.provider_type.clone(),
                    tags,
                    remote_user: "root".into(),
                    ..InstanceInfo::default()
                }
                .into(),
                type_name: fi.type_name.clone(),
                // Prices are config: a changed price applies to the running instances too.
                price: it.map_or(fi.price, |t| t.price),
                vcpus: it.map_or(0, |t| t.vcpus),
                quota_group: it.map(|t| t.quota_group.clone()).unwrap_or_default(),
                created_at: 0,
                ssh_at: ready,
                boot_at: ready,
                broken_at: NEVER,
                report_broken_at: NEVER,
                ssh_reported: fi.boot_in.is_none(),
                crunch_run_missing: false,
                runner_installed: true,
                procs: Procs::default(),
                list_match: Instance::UNLISTED,
            },
        );
    }
    for f in &p.containers {
        let uuid = f.container.uuid.clone();
        w.api.submit(0, f.container.clone());
        w.checker.submitted += 1;
        w.fork_payload(&uuid, Duration::from_millis(f.runtime_ms));
        if let Some((inst, left)) = &f.running_on {
            w.api.set_state(0, &uuid, ContainerState::Locked, "");
            w.api.set_state(0, &uuid, ContainerState::Running, "");
            if let Some(r) = w.api.rows.get_mut(&uuid) {
                r.lock_count = 1;
            }
            let token = w.fork_token();
            if let Some(i) = w.cloud.instances.get_mut(inst.as_str()) {
                i.procs.insert(
                    uuid.clone(),
                    Proc {
                        token,
                        exited: false,
                        stale_until: 0,
                        ignore_term: false,
                    },
                );
            }
            w.checker.proc_started(&uuid, &Key::new(inst));
            w.checker.payload_started(0, &uuid);
            w.fork_exit(*left, inst, &uuid, token);
        }
    }
    for a in arrivals {
        w.fork_arrival(a.clone());
    }
    Ok(())
}

/// The future arrivals as submissions, for a config (preemptible under
/// `AlwaysUsePreemptibleInstances` when the config has preemptible types).
fn submissions(s: &Snapshot, p: &Plan, config: &Value, loaded: &Loaded) -> Vec<Submission> {
    let always = config
        .get("Clusters")
        .and_then(|c| c.get(s.cluster_id.as_str()))
        .and_then(|c| c.get("Containers"))
        .and_then(|c| c.get("AlwaysUsePreemptibleInstances"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
        && loaded.core.instance_types.values().any(|t| t.preemptible);
    p.arrivals
        .iter()
        .enumerate()
        .map(|(n, (k, at, runtime))| {
            let c = &s.arrivals.classes[*k];
            let mut container = Container {
                uuid: Key::from(format!("{}-dz642-w{:014}", s.cluster_id, n + 1)),
                priority: c.priority.max(1),
                runtime_constraints: c.runtime_constraints.clone(),
                ..Container::default()
            };
            container.runtime_constraints.keep_cache_disk = c.scratch;
            container.scheduling_parameters.preemptible =
                c.preemptible || (always && !c.supervisor);
            container.scheduling_parameters.supervisor = c.supervisor;
            Submission {
                at: *at,
                container,
                runtime: Duration::from_millis(*runtime),
                cancel_after: None,
                workflow: None,
            }
        })
        .collect()
}

fn run_variant(
    label: &str,
    changes: &[Change],
    s: &Snapshot,
    p: &Plan,
    config: Value,
    loaded: &Loaded,
    opts: &Options,
) -> Result<Variant, WhatifError> {
    let end = (opts.hours * 3_600_000.0).round() as u64;
    let arrivals = submissions(s, p, &config, loaded);
    let scenario = scenario_for(label, config, opts, Duration::from_millis(end));
    let tracker = Rc::new(RefCell::new(Tracker::default()));
    let mut initial = Vec::new();
    {
        let mut t = tracker.borrow_mut();
        for i in &p.instances {
            t.type_of.insert(i.id.clone(), i.type_name.clone());
            initial.push((0u64, i.type_name.clone(), 1i32));
        }
    }
    let log: Box<dyn Write> = Box::new(TrackerWriter(tracker.clone()));
    let mut w = World::new_prepared(scenario, Path::new("."), opts.seed, Some(log), |w| {
        prepare(w, p, &arrivals)
    })
    .map_err(|e| WhatifError::Run(format!("{label}: {e}")))?;
    w.run(|_, _| {});
    let now = w.now;
    let forked_running: BTreeSet<&str> = p
        .containers
        .iter()
        .filter(|f| f.running_on.is_some())
        .map(|f| f.container.uuid.as_str())
        .collect();
    let prior: BTreeMap<&str, f64> = p
        .containers
        .iter()
        .map(|f| (f.container.uuid.as_str(), f.prior_wait_s))
        .collect();
    let rows: Vec<Row> = w
        .api
        .rows
        .values()
        .map(|r| Row {
            created_at: r.c.created_at.0,
            running_at: r.running_at,
            ended_at: r.ended_at,
            state: r.c.state,
            forked_running: forked_running.contains(r.c.uuid.as_str()),
            prior_wait_s: prior.get(r.c.uuid.as_str()).copied().unwrap_or(0.0),
        })
        .collect();
    let mut cancel_reasons: BTreeMap<String, usize> = BTreeMap::new();
    for r in w.api.rows.values() {
        if r.c.state == ContainerState::Cancelled {
            *cancel_reasons
                .entry(r.cancel_reason.clone().unwrap_or_default())
                .or_default() += 1;
        }
    }
    let mut waits: Vec<f64> = rows
        .iter()
        .filter(|r| !r.forked_running)
        .filter_map(|r| {
            r.running_at
                .map(|t| t.saturating_sub(r.created_at) as f64 / 1000.0 + r.prior_wait_s)
        })
        .collect();
    waits.sort_by(f64::total_cmp);
    let waiting: Vec<f64> = rows
        .iter()
        .filter(|r| matches!(r.state, ContainerState::Queued | ContainerState::Locked))
        .map(|r| end.max(now).saturating_sub(r.created_at) as f64 / 1000.0 + r.prior_wait_s)
        .collect();
    let billing = w.cloud.cost_at(now);
    let mut changes_series = {
        let mut t = tracker.borrow_mut();
        let mut c = std::mem::take(&mut t.changes);
        c.extend(initial);
        c
    };
    changes_series.sort_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
    let series = Series {
        changes: changes_series,
        end_ms: end,
    };
    let mut alive = 0i64;
    let mut peak = 0i64;
    for (_, _, d) in &series.changes {
        alive += i64::from(*d);
        peak = peak.max(alive);
    }
    let points = ((opts.hours * POINTS_PER_HOUR as f64).ceil() as u64).max(1);
    let mut timeline = Vec::with_capacity(points as usize + 1);
    let mut next = 0;
    let mut alive = 0i64;
    for k in 0..=points {
        let t = (end as u128 * k as u128 / points as u128) as u64;
        while next < series.changes.len() && series.changes[next].0 <= t {
            alive += i64::from(series.changes[next].2);
            next += 1;
        }
        let live = |r: &&Row| r.ended_at.is_none_or(|e| e > t) && r.created_at <= t;
        let queued = rows
            .iter()
            .filter(live)
            .filter(|r| r.running_at.is_none_or(|s| s > t))
            .count();
        let running = rows
            .iter()
            .filter(live)
            .filter(|r| r.running_at.is_some_and(|s| s <= t))
            .count();
        timeline.push(Point {
            hour: t as f64 / 3_600_000.0,
            queued,
            running,
            instances: alive.max(0),
        });
    }
    Ok(Variant {
        label: label.to_string(),
        changes: changes.iter().map(|c| c.text.clone()).collect(),
        cost_usd: billing.cost_usd,
        instance_hours: billing.seconds_by_type.values().sum::<f64>() / 3600.0,
        instance_hours_by_type: billing
            .seconds_by_type
            .iter()
            .map(|(k, v)| (k.clone(), v / 3600.0))
            .collect(),
        completed: rows
            .iter()
            .filter(|r| r.state == ContainerState::Complete)
            .count(),
        cancelled: rows
            .iter()
            .filter(|r| r.state == ContainerState::Cancelled)
            .count(),
        cancel_reasons,
        started: waits.len(),
        wait_p50_s: percentile(&waits, 0.5),
        wait_p95_s: percentile(&waits, 0.95),
        wait_max_s: waits.last().copied().unwrap_or(0.0),
        waiting_at_end: waiting.len(),
        longest_waiting_at_end_s: waiting.iter().copied().fold(0.0, f64::max),
        running_at_end: rows
            .iter()
            .filter(|r| r.state == ContainerState::Running)
            .count(),
        instances_created: w.cloud.created,
        instances_peak: peak,
        invariant_violations: w.checker.violation_count,
        event_log_hash: w.log.hash_hex(),
        timeline,
        series,
    })
}

/// Forks `s` and runs the baseline and the changed world.
pub fn run(s: &Snapshot, source: &str, opts: &Options) -> Result<Outcome, WhatifError> {
    if !(opts.hours > 0.0 && opts.hours <= HOURS_MAX) {
        return Err(WhatifError::Option {
            option: "--hours".into(),
            value: opts.hours.to_string(),
            message: format!("must be more than 0 and at most {HOURS_MAX}"),
        });
    }
    let mut notes = Vec::new();
    let (base, base_loaded, changed, changed_loaded) = configs(s, &opts.changes, &mut notes)?;
    let p = plan(s, opts);
    notes.extend(p.notes.iter().cloned());
    let baseline = run_variant("baseline", &[], s, &p, base, &base_loaded, opts)?;
    let with = run_variant(
        "changed",
        &opts.changes,
        s,
        &p,
        changed,
        &changed_loaded,
        opts,
    )?;
    let d = Difference {
        cost_usd: with.cost_usd - baseline.cost_usd,
        cost_percent: if baseline.cost_usd > 0.0 {
            (with.cost_usd - baseline.cost_usd) / baseline.cost_usd * 100.0
        } else {
            0.0
        },
        instance_hours: with.instance_hours - baseline.instance_hours,
        completed: with.completed as i64 - baseline.completed as i64,
        started: with.started as i64 - baseline.started as i64,
        wait_p50_s: with.wait_p50_s - baseline.wait_p50_s,
        wait_p95_s: with.wait_p95_s - baseline.wait_p95_s,
        wait_max_s: with.wait_max_s - baseline.wait_max_s,
        waiting_at_end: with.waiting_at_end as i64 - baseline.waiting_at_end as i64,
    };
    Ok(Outcome {
        snapshot: SnapshotSummary {
            source: source.to_string(),
            cluster_id: s.cluster_id.clone(),
            taken_at_ms: s.taken_at_ms,
            queued: p
                .containers
                .iter()
                .filter(|c| c.running_on.is_none())
                .count(),
            running: p
                .containers
                .iter()
                .filter(|c| c.running_on.is_some())
                .count(),
            instances: p.instances.len(),
            arrivals_per_hour: s.arrivals.per_hour,
            arrivals_observed_seconds: s.arrivals.observed_seconds,
            runtimes_observed: s.arrivals.runtimes_observed,
            arrivals_simulated: p.arrivals.len(),
        },
        hours: opts.hours,
        seed: opts.seed,
        changes: opts.changes.iter().map(|c| c.text.clone()).collect(),
        baseline,
        changed: with,
        difference: d,
        notes,
    })
}

// ----- outputs --------------------------------------------------------------------------------

/// The comparison as text.
pub fn text(o: &Outcome) -> String {
    let mut s = String::new();
    let sn = &o.snapshot;
    let _ = writeln!(
        s,
        "what-if from {} (cluster {}, taken at {} ms): {} queued, {} running, {} instances",
        sn.source, sn.cluster_id, sn.taken_at_ms, sn.queued, sn.running, sn.instances
    );
    let _ = writeln!(
        s,
        "arrivals: {:.1}/h observed over {:.0} s, {} simulated; {} run times observed",
        sn.arrivals_per_hour,
        sn.arrivals_observed_seconds,
        sn.arrivals_simulated,
        sn.runtimes_observed
    );
    let _ = writeln!(
        s,
        "{} hours, seed {}, changes: {}",
        o.hours,
        o.seed,
        if o.changes.is_empty() {
            "(none)".to_string()
        } else {
            o.changes.join(", ")
        }
    );
    for n in &o.notes {
        let _ = writeln!(s, "note: {n}");
    }
    let (b, c) = (&o.baseline, &o.changed);
    let _ = writeln!(
        s,
        "\n{:>6}  {:>15}  {:>15}  {:>15}",
        "hour", "queued", "running", "instances"
    );
    let _ = writeln!(
        s,
        "{:>6}  {:>7} {:>7}  {:>7} {:>7}  {:>7} {:>7}",
        "", "base", "changed", "base", "changed", "base", "changed"
    );
    for (pb, pc) in b.timeline.iter().zip(&c.timeline) {
        if !((pb.hour * POINTS_PER_HOUR as f64).round() as u64).is_multiple_of(POINTS_PER_HOUR)
            && pb.hour < o.hours
        {
            continue;
        }
        let _ = writeln!(
            s,
            "{:>6.2}  {:>7} {:>7}  {:>7} {:>7}  {:>7} {:>7}",
            pb.hour, pb.queued, pc.queued, pb.running, pc.running, pb.instances, pc.instances
        );
    }
    let _ = writeln!(
        s,
        "\n{:<28} {:>12} {:>12} {:>12}",
        "", "baseline", "changed", "difference"
    );
    let row = |s: &mut String, name: &str, x: f64, y: f64, prec: usize| {
        let _ = writeln!(
            s,
            "{name:<28} {x:>12.prec$} {y:>12.prec$} {:>+12.prec$}",
            y - x
        );
    };
    row(&mut s, "cost, $", b.cost_usd, c.cost_usd, 2);
    row(
        &mut s,
        "instance-hours",
        b.instance_hours,
        c.instance_hours,
        2,
    );
    row(
        &mut s,
        "completed",
        b.completed as f64,
        c.completed as f64,
        0,
    );
    row(&mut s, "started", b.started as f64, c.started as f64, 0);
    row(&mut s, "wait p50, s", b.wait_p50_s, c.wait_p50_s, 0);
    row(&mut s, "wait p95, s", b.wait_p95_s, c.wait_p95_s, 0);
    row(&mut s, "wait max, s", b.wait_max_s, c.wait_max_s, 0);
    row(
        &mut s,
        "waiting at the end",
        b.waiting_at_end as f64,
        c.waiting_at_end as f64,
        0,
    );
    row(
        &mut s,
        "longest waiting at end, s",
        b.longest_waiting_at_end_s,
        c.longest_waiting_at_end_s,
        0,
    );
    row(
        &mut s,
        "cancelled",
        b.cancelled as f64,
        c.cancelled as f64,
        0,
    );
    row(
        &mut s,
        "instances created",
        b.instances_created as f64,
        c.instances_created as f64,
        0,
    );
    row(
        &mut s,
        "instances at peak",
        b.instances_peak as f64,
        c.instances_peak as f64,
        0,
    );
    row(
        &mut s,
        "invariant violations",
        b.invariant_violations as f64,
        c.invariant_violations as f64,
        0,
    );
    if o.baseline.cost_usd > 0.0 {
        let _ = writeln!(
            s,
            "\nwith the changes the cost is {:+.1}% and the p95 wait {:+.0} s",
            o.difference.cost_percent, o.difference.wait_p95_s
        );
    }
    s
}

/// The comparison as JSON.
pub fn json(o: &Outcome) -> String {
    serde_json::to_string_pretty(o).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
}

fn queue_svg(o: &Outcome) -> String {
    use crate::report_html::esc;
    let (w, h, ml, mr, mt, mb) = (940.0, 360.0, 70.0, 160.0, 20.0, 50.0);
    let series = [
        ("baseline", &o.baseline, "#f28e2b"),
        ("changed", &o.changed, "#4e79a7"),
    ];
    let vmax = series
        .iter()
        .flat_map(|(_, v, _)| v.timeline.iter().map(|p| p.queued))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    // A round tick step: 1, 2, 2.5 or 5 times a power of ten, about four ticks.
    let raw = vmax / 4.0;
    let mag = 10f64.powf(raw.log10().floor());
    let tick = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| (m * mag).max(1.0))
        .find(|t| *t >= raw)
        .unwrap_or(10.0 * mag);
    let ticks = (vmax / tick).ceil() as u64;
    let ymax = tick * ticks as f64 * 1.05;
    let x = |hour: f64| ml + hour / o.hours.max(1e-9) * (w - ml - mr);
    let y = |v: f64| h - mb - v / ymax * (h - mt - mb);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg id="queue" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="Queue length over time">"##
    );
    let _ = write!(
        s,
        r##"<g class="axes" stroke="#444" font-size="11"><line x1="{ml}" y1="{b}" x2="{r}" y2="{b}"/><line x1="{ml}" y1="{mt}" x2="{ml}" y2="{b}"/>"##,
        b = h - mb,
        r = w - mr
    );
    let hours = o.hours.ceil().max(1.0) as u64;
    let step = (hours / 12).max(1);
    for k in (0..=hours).step_by(step as usize) {
        let hx = x(k as f64);
        let _ = write!(
            s,
            r##"<text x="{hx:.1}" y="{ty}" text-anchor="middle" stroke="none">{k}</text>"##,
            ty = h - mb + 18.0
        );
    }
    for k in 0..=ticks {
        let v = tick * k as f64;
        let _ = write!(
            s,
            r##"<line x1="{ml}" y1="{yy:.1}" x2="{r}" y2="{yy:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end" stroke="none">{v:.0}</text>"##,
            yy = y(v),
            r = w - mr,
            tx = ml - 8.0,
            ty = y(v) + 4.0
        );
    }
    let _ = write!(
        s,
        r##"<text x="{cx}" y="{by}" text-anchor="middle" stroke="none" font-size="12">hours after the snapshot</text><text transform="translate(16 {cy}) rotate(-90)" text-anchor="middle" stroke="none" font-size="12">containers waiting</text></g>"##,
        cx = (ml + w - mr) / 2.0,
        by = h - 10.0,
        cy = (mt + h - mb) / 2.0
    );
    for (k, (name, v, color)) in series.iter().enumerate() {
        let pts: Vec<String> = v
            .timeline
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.hour), y(p.queued as f64)))
            .collect();
        let _ = write!(
            s,
            r##"<polyline class="series" data-variant="{name}" fill="none" stroke="{color}" stroke-width="2" points="{}"><title>{name}</title></polyline>"##,
            pts.join(" ")
        );
        let ly = mt + 10.0 + k as f64 * 16.0;
        let lx = w - mr + 20.0;
        let _ = write!(
            s,
            r##"<rect x="{lx}" y="{ry}" width="10" height="10" fill="{color}"/><text x="{tx}" y="{ty}" font-size="11">{}</text>"##,
            esc(name),
            ry = ly - 5.0,
            tx = lx + 14.0,
            ty = ly + 4.0
        );
    }
    s.push_str("</svg>");
    s
}

/// A self-contained HTML page: queue length over time for both runs, instances by type over
/// time for each, and the comparison table.
pub fn html(o: &Outcome) -> String {
    use crate::report_html::{esc, instances_svg};
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>What-if {cluster}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
pre {{ background: #fafafa; border: 1px solid #ccc; padding: 0.5em 1em; }}
</style></head><body>
<h1>What-if: {changes}</h1>
<h2>Containers waiting</h2>
{queue}
<h2>Instances by type: baseline</h2>
{base}
<h2>Instances by type: with the changes</h2>
{changed}
<h2>Comparison</h2>
<pre>{text}</pre>
</body></html>
"##,
        cluster = esc(&o.snapshot.cluster_id),
        changes = esc(&if o.changes.is_empty() {
            "(no change)".to_string()
        } else {
            o.changes.join(", ")
        }),
        queue = queue_svg(o),
        base = instances_svg("instances-baseline", &o.baseline.series),
        changed = instances_svg("instances-changed", &o.changed.series),
        text = esc(&text(o)),
    );
    s
}

/// Writes whatif.json, whatif.txt and whatif.html into `dir`.
#[allow(clippy::disallowed_methods)]
pub fn write_outputs(o: &Outcome, dir: &Path) -> Result<(), WhatifError> {
    let werr = |path: &Path| {
        let path = path.display().to_string();
        move |source| WhatifError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(werr(dir))?;
    for (name, body) in [
        ("whatif.json", json(o)),
        ("whatif.txt", text(o)),
        ("whatif.html", html(o)),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, body).map_err(werr(&path))?;
    }
    Ok(())
}

// ----- snapshots of simulated runs -------------------------------------------------------------

/// Runs a scenario file up to `at` (or its end, if earlier) and takes the dispatcher's
/// snapshot there. Returns the snapshot and the world (for its report).
pub fn snapshot_of_scenario(
    path: &Path,
    seed: Option<u64>,
    at: Duration,
    log_out: Option<Box<dyn Write>>,
    progress: impl FnMut(u64, u64),
) -> Result<(Snapshot, World), String> {
    let mut scenario = Scenario::load(path).map_err(|e| e.to_string())?;
    if at.is_zero() {
        return Err("--snapshot-at: must be more than 0".to_string());
    }
    if at > scenario.duration.0 {
        return Err(format!(
            "--snapshot-at {}s: after the end of scenario {:?} ({}s)",
            at.as_secs_f64(),
            scenario.name,
            scenario.duration.0.as_secs_f64()
        ));
    }
    scenario.duration = Dur(at);
    scenario.restarts.retain(|r| r.0 <= at);
    let seed = seed.unwrap_or(scenario.seed);
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut w =
        World::new(scenario, dir, seed, log_out).map_err(|e| format!("{}: {e}", path.display()))?;
    w.run(progress);
    w.log
        .flush()
        .map_err(|e| format!("writing the event log: {e}"))?;
    let snap = snapshot::build(&w.d, arvados_dispatch_cloud::core::Timestamp(w.now));
    Ok((snap, w))
}
