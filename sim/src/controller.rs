//! `dispatch-sim controller`: a stand-in Arvados controller over real HTTP, for end-to-end runs
//! of the production dispatcher and the stand-in crunch-run on one machine.
//!
//! It serves the subset of the controller API the dispatcher and crunch-run use: the token
//! lookup (`GET arvados/v1/api_client_authorizations/current`), container lists with filters,
//! ordering, offset and limit (also as a `POST` with `X-Http-Method-Override: GET`), single
//! container reads with `select`, `lock`, `unlock` and `PUT` updates (state, `runtime_status`,
//! `exit_code`). The container table and its rules are the simulator's (`crate::api`:
//! lock needs Queued and priority > 0 and counts `lock_count`, unlock past
//! `MaxDispatchAttempts` cancels, the allowed state transitions), so the stand-in enforces the
//! same server-side rules as the simulated controller. `GET /_standin/status` reports counts by
//! state and, per container, its state, `lock_count` and how many times it entered Running.
//!
//! Workload file (YAML or JSON): either a list of containers or an object
//! `{cluster_id, max_dispatch_attempts, containers: [...]}`; each container has optional
//! `uuid`, `vcpus`, `ram` (bytes), `keep_cache_ram`, `scratch` (bytes, a `tmp` mount),
//! `priority`, `preemptible`, `supervisor`, `container_image`, `run_seconds` and `exit_code`.
//! The last two are what the stand-in crunch-run does; they come back in a stand-in-only field
//! `standin: {"run_seconds": …, "exit_code": …}` of the container record.
//!
//! Invariants: every API request must carry the configured token (`Authorization: Bearer` or
//! `OAuth2`); the token is never logged; a malformed request is a 4xx with an Arvados error
//! body, never a panic. It is a server for loopback tests: it binds where it is told, opens no
//! outgoing connections, and reads the wall clock only to stamp records.

// The stand-in serves real clients in real time: it may read the clock and the environment.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arvados_dispatch_cloud::core::key::Key;
use arvados_dispatch_cloud::core::types::{Container, ContainerState, Mount};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::{Controller, DISPATCHER_TOKEN_UUID};

/// Rails' default and maximum page sizes.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Bound on the workload size.
const MAX_CONTAINERS: usize = 1_000_000;

/// One container of a workload file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadContainer {
    /// UUID (default `<cluster_id>-dz642-<index, 15 digits>`).
    #[serde(default)]
    pub uuid: Option<String>,
    /// `runtime_constraints.vcpus`.
    #[serde(default = "one")]
    pub vcpus: i64,
    /// `runtime_constraints.ram`, bytes.
    #[serde(default = "default_ram")]
    pub ram: i64,
    /// `runtime_constraints.keep_cache_ram`, bytes.
    #[serde(default)]
    pub keep_cache_ram: i64,
    /// Capacity of a `tmp` mount at `/tmp`, bytes (0: no mount).
    #[serde(default)]
    pub scratch: i64,
    /// Priority.
    #[serde(default = "one")]
    pub priority: i64,
    /// `scheduling_parameters.preemptible`.
    #[serde(default)]
    pub preemptible: bool,
    /// `scheduling_parameters.supervisor`.
    #[serde(default)]
    pub supervisor: bool,
    /// Image PDH.
    #[serde(default = "default_image")]
    pub container_image: String,
    /// How long the stand-in crunch-run runs it.
    #[serde(default = "default_run")]
    pub run_seconds: f64,
    /// The exit code it reports.
    #[serde(default)]
    pub exit_code: i64,
}

fn one() -> i64 {
    1
}
fn default_ram() -> i64 {
    256 << 20
}
fn default_image() -> String {
    "d41d8cd98f00b204e9800998ecf8427e+0".to_string()
}
fn default_run() -> f64 {
    1.0
}
fn default_cluster() -> String {
    "zzzzz".to_string()
}
fn default_attempts() -> i64 {
    10
}

/// A workload file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Cluster prefix for generated UUIDs.
    #[serde(default = "default_cluster")]
    pub cluster_id: String,
    /// `Containers.MaxDispatchAttempts`.
    #[serde(default = "default_attempts")]
    pub max_dispatch_attempts: i64,
    /// The containers, all Queued at start.
    pub containers: Vec<WorkloadContainer>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WorkloadFile {
    Full(Workload),
    List(Vec<WorkloadContainer>),
}

/// Why a workload cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The file could not be read.
    #[error("workload {path}: {err}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// The file is not a workload.
    #[error("workload {path}: {err}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        err: String,
    },
    /// A value is out of range or repeated.
    #[error("workload {path}: container {index}: {what}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Position in the list.
        index: usize,
        /// What is wrong.
        what: String,
    },
}

impl Workload {
    /// Reads and checks a workload file.
    pub fn load(path: &Path) -> Result<Workload, WorkloadError> {
        let text = std::fs::read_to_string(path).map_err(|err| WorkloadError::Read {
            path: path.to_path_buf(),
            err,
        })?;
        Workload::parse(&text).map_err(|e| match e {
            WorkloadError::Parse { err, .. } => WorkloadError::Parse {
                path: path.to_path_buf(),
                err,
            },
            WorkloadError::Invalid { index, what, .. } => WorkloadError::Invalid {
                path: path.to_path_buf(),
                index,
                what,
            },
            other => other,
        })
    }

    /// Parses a workload from YAML or JSON text.
    pub fn parse(text: &str) -> Result<Workload, WorkloadError> {
        let parsed: WorkloadFile =
            serde_yaml::from_str(text).map_err(|e| WorkloadError::Parse {
                path: PathBuf::new(),
                err: e.to_string(),
            })?;
        let w = match parsed {
            WorkloadFile::Full(w) => w,
            WorkloadFile::List(containers) => Workload {
                cluster_id: default_cluster(),
                max_dispatch_attempts: default_attempts(),
                containers,
            },
        };
        let bad = |index: usize, what: String| WorkloadError::Invalid {
            path: PathBuf::new(),
            index,
            what,
        };
        if w.containers.len() > MAX_CONTAINERS {
            return Err(bad(
                w.containers.len(),
                format!("more than {MAX_CONTAINERS} containers"),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in w.containers.iter().enumerate() {
            if c.vcpus < 0 || c.ram < 0 || c.keep_cache_ram < 0 || c.scratch < 0 {
                return Err(bad(
                    i,
                    "vcpus, ram, keep_cache_ram and scratch must be >= 0".into(),
                ));
            }
            if !(c.run_seconds.is_finite() && c.run_seconds >= 0.0) {
                return Err(bad(
                    i,
                    format!("run_seconds {} is not a duration", c.run_seconds),
                ));
            }
            let uuid = w.uuid_of(i);
            if uuid.is_empty() || uuid.contains(['/', '?', '#', ' ']) {
                return Err(bad(i, format!("uuid {uuid:?} is not usable in a URL path")));
            }
            if !seen.insert(uuid.clone()) {
                return Err(bad(i, format!("uuid {uuid} appears twice")));
            }
        }
        Ok(w)
    }

    fn uuid_of(&self, i: usize) -> String {
        self.containers[i]
            .uuid
            .clone()
            .unwrap_or_else(|| format!("{}-dz642-{i:015}", self.cluster_id))
    }
}

/// What the stand-in tracks beyond the simulated controller's table.
#[derive(Clone, Debug, Default)]
struct Extra {
    run_seconds: f64,
    workload_exit_code: i64,
    mounts: BTreeMap<String, Mount>,
    runtime_status: Map<String, Value>,
    exit_code: Option<i64>,
    running_entries: u32,
}

/// The stand-in's state: the simulated controller plus per-container extras.
pub struct StandIn {
    ctl: Controller,
    extra: BTreeMap<String, Extra>,
    token: String,
    quiet: bool,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn")
            .field("containers", &self.extra.len())
            .field("token", &"[redacted]")
            .finish()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 with nanoseconds, as the controller prints times.
pub fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        (ms % 1000) * 1_000_000
    )
}

impl StandIn {
    /// A stand-in serving `workload`, accepting `token`. `quiet` turns off request logging.
    pub fn new(workload: &Workload, token: &str, quiet: bool) -> StandIn {
        let mut ctl = Controller::new(workload.max_dispatch_attempts, Vec::new());
        let mut extra = BTreeMap::new();
        let now = now_ms();
        for (i, w) in workload.containers.iter().enumerate() {
            let uuid = workload.uuid_of(i);
            let mut c = Container {
                uuid: uuid.as_str().into(),
                priority: w.priority,
                container_image: w.container_image.clone(),
                ..Container::default()
            };
            c.runtime_constraints.vcpus = w.vcpus;
            c.runtime_constraints.ram = w.ram;
            c.runtime_constraints.keep_cache_ram = w.keep_cache_ram;
            c.scheduling_parameters.preemptible = w.preemptible;
            c.scheduling_parameters.supervisor = w.supervisor;
            let mut mounts = BTreeMap::new();
            if w.scratch > 0 {
                mounts.insert(
                    "/tmp".to_string(),
                    Mount {
                        kind: "tmp".into(),
                        capacity: w.scratch,
                    },
                );
            }
            ctl.submit(now, c);
            extra.insert(
                uuid,
                Extra {
                    run_seconds: w.run_seconds,
                    workload_exit_code: w.exit_code,
                    mounts,
                    ..Extra::default()
                },
            );
        }
        StandIn {
            ctl,
            extra,
            token: token.to_string(),
            quiet,
        }
    }

    /// The full record of one container, as the API returns it.
    fn record(&self, uuid: &str) -> Option<Value> {
        let row = self.ctl.rows.get(uuid)?;
        let x = self.extra.get(uuid)?;
        let c = &row.c;
        Some(json!({
            "kind": "arvados#container",
            "uuid": c.uuid,
            "state": c.state.as_str(),
            "priority": c.priority,
            "runtime_constraints": c.runtime_constraints,
            "scheduling_parameters": c.scheduling_parameters,
            "container_image": c.container_image,
            "created_at": rfc3339(c.created_at.0),
            "locked_by_uuid": c.locked_by_uuid,
            "lock_count": row.lock_count,
            "mounts": x.mounts,
            "runtime_status": x.runtime_status,
            "exit_code": x.exit_code,
            "standin": {"run_seconds": x.run_seconds, "exit_code": x.workload_exit_code},
        }))
    }

    /// `GET /_standin/status`.
    pub fn status(&self) -> Value {
        let mut counts: BTreeMap<&str, usize> = [
            ContainerState::Queued,
            ContainerState::Locked,
            ContainerState::Running,
            ContainerState::Complete,
            ContainerState::Cancelled,
        ]
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
        let mut containers = Map::new();
        for (uuid, row) in &self.ctl.rows {
            *counts.entry(row.c.state.as_str()).or_default() += 1;
            let x = self.extra.get(uuid.as_str()).cloned().unwrap_or_default();
            containers.insert(
                uuid.to_string(),
                json!({
                    "state": row.c.state.as_str(),
                    "priority": row.c.priority,
                    "lock_count": row.lock_count,
                    "running_entries": x.running_entries,
                    "exit_code": x.exit_code,
                    "runtime_status": x.runtime_status,
                }),
            );
        }
        let total = self.ctl.rows.len();
        let finished = counts["Complete"] + counts["Cancelled"];
        json!({
            "counts": counts,
            "total": total,
            "finished": finished,
            "all_finished": finished == total,
            "containers": containers,
        })
    }
}

/// Decodes `application/x-www-form-urlencoded` text.
pub fn decode_form(s: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(s.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn error(status: StatusCode, msg: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        json!({"errors": [msg], "error_token": format!("{}+standin", now_ms() / 1000)}).to_string(),
    )
        .into_response()
}

fn ok(v: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// Request parameters: the query string merged with a form or JSON body.
fn params(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Result<BTreeMap<String, Value>, String> {
    let mut out = BTreeMap::new();
    let mut put = |k: String, v: String| {
        // Values that parse as JSON arrays, objects or numbers are JSON; the rest are strings.
        let parsed = match serde_json::from_str::<Value>(&v) {
            Ok(j @ (Value::Array(_) | Value::Object(_) | Value::Number(_) | Value::Bool(_))) => j,
            _ => Value::String(v),
        };
        out.insert(k, parsed);
    };
    for (k, v) in decode_form(uri.query().unwrap_or("")) {
        put(k, v);
    }
    if !body.is_empty() {
        let ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let text =
            std::str::from_utf8(body).map_err(|_| "request body is not UTF-8".to_string())?;
        if ct.starts_with("application/json") {
            let v: Value =
                serde_json::from_str(text).map_err(|e| format!("request body is not JSON: {e}"))?;
            let Value::Object(m) = v else {
                return Err("request body is not a JSON object".into());
            };
            out.extend(m);
        } else {
            for (k, v) in decode_form(text) {
                put(k, v);
            }
        }
    }
    Ok(out)
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let given = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("OAuth2 "))
        .unwrap_or("");
    // Constant-time comparison is not needed for a loopback test server, but cheap.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn select(v: Value, sel: Option<&Value>) -> Result<Value, String> {
    let Some(sel) = sel else { return Ok(v) };
    let Some(fields) = sel.as_array() else {
        return Err(format!("select must be a JSON array, not {sel}"));
    };
    let Value::Object(m) = v else { return Ok(v) };
    let mut out = Map::new();
    for f in fields {
        let Some(name) = f.as_str() else {
            return Err(format!("select entry {f} is not a string"));
        };
        if let Some(x) = m.get(name) {
            out.insert(name.to_string(), x.clone());
        }
    }
    Ok(Value::Object(out))
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), _) => {
            let y = match b {
                Value::Number(n) => n.as_f64()?,
                Value::String(s) => s.parse::<f64>().ok()?,
                _ => return None,
            };
            x.as_f64()?.partial_cmp(&y)
        }
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn matches(rec: &Value, filter: &Value) -> Result<bool, String> {
    let Some([attr, op, operand]) = filter.as_array().map(Vec::as_slice) else {
        return Err(format!(
            "invalid filter {filter}: want [attribute, operator, operand]"
        ));
    };
    let (Some(attr), Some(op)) = (attr.as_str(), op.as_str()) else {
        return Err(format!("invalid filter {filter}"));
    };
    if !matches!(
        attr,
        "uuid" | "state" | "priority" | "locked_by_uuid" | "created_at"
    ) {
        return Err(format!("invalid attribute {attr:?} in filter"));
    }
    let v = rec.get(attr).cloned().unwrap_or(Value::Null);
    use std::cmp::Ordering::*;
    Ok(match op {
        "=" => compare(&v, operand) == Some(Equal) || (v.is_null() && operand.is_null()),
        "!=" => !(compare(&v, operand) == Some(Equal) || (v.is_null() && operand.is_null())),
        ">" => compare(&v, operand) == Some(Greater),
        ">=" => matches!(compare(&v, operand), Some(Greater | Equal)),
        "<" => compare(&v, operand) == Some(Less),
        "<=" => matches!(compare(&v, operand), Some(Less | Equal)),
        "in" | "not in" => {
            let Some(list) = operand.as_array() else {
                return Err(format!("operand of {op:?} must be an array in {filter}"));
            };
            let found = list.iter().any(|x| compare(&v, x) == Some(Equal));
            found == (op == "in")
        }
        _ => return Err(format!("invalid operator {op:?} in filter")),
    })
}

fn as_usize(v: Option<&Value>, what: &str, default: usize) -> Result<usize, String> {
    match v {
        None => Ok(default),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| format!("{what} {n} must be a non-negative integer")),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| format!("{what} {s:?} must be a non-negative integer")),
        Some(other) => Err(format!("{what} {other} must be a non-negative integer")),
    }
}

impl StandIn {
    fn list(&self, p: &BTreeMap<String, Value>) -> Result<Value, String> {
        let filters = match p.get("filters") {
            None => Vec::new(),
            Some(Value::Array(f)) => f.clone(),
            Some(other) => return Err(format!("filters must be a JSON array, not {other}")),
        };
        let mut recs = Vec::new();
        for uuid in self.ctl.rows.keys() {
            let Some(r) = self.record(uuid) else { continue };
            let mut keep = true;
            for f in &filters {
                if !matches(&r, f)? {
                    keep = false;
                    break;
                }
            }
            if keep {
                recs.push(r);
            }
        }
        let order = match p.get("order") {
            None => "uuid".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            Some(other) => return Err(format!("order {other} is not a string")),
        };
        let mut keys: Vec<(String, bool)> = Vec::new();
        for part in order.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let mut it = part.split_whitespace();
            let attr = it.next().unwrap_or("").to_string();
            let desc = match it.next() {
                None | Some("asc") | Some("ASC") => false,
                Some("desc") | Some("DESC") => true,
                Some(d) => return Err(format!("invalid order direction {d:?}")),
            };
            if !matches!(attr.as_str(), "uuid" | "priority" | "created_at" | "state") {
                return Err(format!("invalid order attribute {attr:?}"));
            }
            keys.push((attr, desc));
        }
        keys.push(("uuid".into(), false));
        recs.sort_by(|a, b| {
            for (k, desc) in &keys {
                let o =
                    compare(&a[k.as_str()], &b[k.as_str()]).unwrap_or(std::cmp::Ordering::Equal);
                let o = if *desc { o.reverse() } else { o };
                if o != std::cmp::Ordering::Equal {
                    return o;
                }
            }
            std::cmp::Ordering::Equal
        });
        let available = recs.len();
        let offset = as_usize(p.get("offset"), "offset", 0)?;
        let limit = as_usize(p.get("limit"), "limit", DEFAULT_LIMIT)?.min(MAX_LIMIT);
        let mut items = Vec::new();
        for r in recs.into_iter().skip(offset).take(limit) {
            items.push(select(r, p.get("select"))?);
        }
        let mut out = json!({
            "kind": "arvados#containerList",
            "etag": "",
            "self_link": "",
            "offset": offset,
            "limit": limit,
            "items": items,
        });
        if p.get("count").and_then(Value::as_str) != Some("none") {
            out["items_available"] = json!(available);
        }
        Ok(out)
    }

    fn update(
        &mut self,
        uuid: &str,
        p: &BTreeMap<String, Value>,
    ) -> Result<Value, (StatusCode, String)> {
        let unprocessable = |m: String| (StatusCode::UNPROCESSABLE_ENTITY, m);
        if !self.ctl.rows.contains_key(uuid) {
            return Err((StatusCode::NOT_FOUND, "Path not found".into()));
        }
        let fields = match p.get("container") {
            Some(Value::Object(m)) => m.clone(),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(m)) => m,
                _ => {
                    return Err(unprocessable(format!(
                        "container {s:?} is not a JSON object"
                    )));
                }
            },
            _ => return Err(unprocessable("no container attributes to update".into())),
        };
        let now = now_ms();
        let mut new_state = None;
        for (k, v) in &fields {
            match k.as_str() {
                "state" => {
                    let s: ContainerState = serde_json::from_value(v.clone())
                        .map_err(|_| unprocessable(format!("invalid state {v}")))?;
                    new_state = Some(s);
                }
                "runtime_status" => {
                    let Value::Object(m) = v else {
                        return Err(unprocessable(format!(
                            "runtime_status {v} is not an object"
                        )));
                    };
                    self.extra
                        .get_mut(uuid)
                        .expect("extra per row")
                        .runtime_status = m.clone();
                }
                "exit_code" => {
                    let code = v
                        .as_i64()
                        .ok_or_else(|| unprocessable(format!("exit_code {v} is not an integer")))?;
                    self.extra.get_mut(uuid).expect("extra per row").exit_code = Some(code);
                }
                // Progress fields crunch-run also sends; accepted and not modelled.
                "log"
                | "output"
                | "progress"
                | "started_at"
                | "finished_at"
                | "gateway_address"
                | "interactive_session_started"
                | "cost"
                | "subrequests_cost"
                | "output_properties" => {}
                other => {
                    return Err(unprocessable(format!(
                        "attribute {other:?} cannot be updated"
                    )));
                }
            }
        }
        if let Some(to) = new_state {
            let from = self.ctl.rows[uuid].c.state;
            if to == ContainerState::Cancelled {
                self.ctl
                    .cancel(now, &Key::new(uuid))
                    .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e.message))?;
            } else if to != from {
                if !self.ctl.set_state(now, &Key::new(uuid), to, "") {
                    return Err(unprocessable(format!(
                        "State cannot change from {from} to {to}"
                    )));
                }
                if to == ContainerState::Running {
                    self.extra
                        .get_mut(uuid)
                        .expect("extra per row")
                        .running_entries += 1;
                }
            }
        }
        Ok(self.record(uuid).expect("the row exists"))
    }
}

type Shared = Arc<Mutex<StandIn>>;

async fn handle(
    State(st): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let resp = route(&st, &method, &uri, &headers, &body);
    let quiet = st.lock().map(|s| s.quiet).unwrap_or(true);
    if !quiet {
        eprintln!("{method} {path} -> {}", resp.status().as_u16());
    }
    resp
}

fn route(st: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
    let Ok(mut s) = st.lock() else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "stand-in state poisoned");
    };
    let path = uri.path();
    if path == "/_standin/status" && method == Method::GET {
        return ok(s.status());
    }
    if !authorized(headers, &s.token) {
        return error(StatusCode::UNAUTHORIZED, "Not logged in");
    }
    let p = match params(uri, headers, body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let overridden = headers
        .get("x-http-method-override")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_uppercase);
    let m = match (method.as_str(), overridden.as_deref()) {
        ("POST", Some(o)) => o.to_string(),
        (m, _) => m.to_string(),
    };
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (m.as_str(), segs.as_slice()) {
        ("GET", ["arvados", "v1", "api_client_authorizations", "current"]) => ok(json!({
            "kind": "arvados#apiClientAuthorization",
            "uuid": DISPATCHER_TOKEN_UUID,
            "scopes": ["all"],
        })),
        ("GET", ["arvados", "v1", "containers"]) => match s.list(&p) {
            Ok(v) => ok(v),
            Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
        },
        ("GET", ["arvados", "v1", "containers", uuid]) => match s.record(uuid) {
            None => error(StatusCode::NOT_FOUND, "Path not found"),
            Some(r) => match select(r, p.get("select")) {
                Ok(v) => ok(v),
                Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
            },
        },
        (
            "POST",
            [
                "arvados",
                "v1",
                "containers",
                uuid,
                action @ ("lock" | "unlock"),
            ],
        ) => {
            let now = now_ms();
            let r = if *action == "lock" {
                s.ctl.lock(now, &Key::new(uuid))
            } else {
                s.ctl.unlock(now, &Key::new(uuid))
            };
            match r {
                Ok(_) => {
                    if *action == "unlock" && s.ctl.rows[*uuid].c.state == ContainerState::Cancelled
                    {
                        let reason = s.ctl.rows[*uuid].cancel_reason.clone().unwrap_or_default();
                        if let Some(x) = s.extra.get_mut(*uuid) {
                            x.runtime_status
                                .insert("error".into(), Value::String(reason));
                        }
                    }
                    ok(s.record(uuid).expect("the row exists"))
                }
                Err(e) => error(
                    StatusCode::from_u16(e.status.unwrap_or(500))
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    &e.message,
                ),
            }
        }
        ("PUT" | "PATCH", ["arvados", "v1", "containers", uuid]) => match s.update(uuid, &p) {
            Ok(v) => match select(v, p.get("select")) {
                Ok(v) => ok(v),
                Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
            },
            Err((status, e)) => error(status, &e),
        },
        _ => error(StatusCode::NOT_FOUND, "Path not found"),
    }
}

/// The stand-in's HTTP routes.
pub fn router(standin: StandIn) -> (axum::Router, Shared) {
    let st: Shared = Arc::new(Mutex::new(standin));
    (
        axum::Router::new().fallback(handle).with_state(st.clone()),
        st,
    )
}

/// Serves `standin` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    standin: StandIn,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (app, _) = router(standin);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `dispatch-sim controller`: binds `listen`, prints `listening on ADDR` on stdout, serves
/// `workload` until SIGINT or SIGTERM. The token comes from `token` or `ARVADOS_API_TOKEN`.
pub fn main(
    listen: &str,
    workload: &Path,
    token: Option<String>,
    quiet: bool,
) -> Result<(), String> {
    let token = match token.or_else(|| std::env::var("ARVADOS_API_TOKEN").ok()) {
        Some(t) if !t.is_empty() => t,
        _ => return Err("no token: pass --token or set ARVADOS_API_TOKEN".into()),
    };
    let w = Workload::load(workload).map_err(|e| e.to_string())?;
    let standin = StandIn::new(&w, &token, quiet);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("--listen {listen}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("--listen {listen}: {e}"))?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {addr}");
            let _ = out.flush();
        }
        serve(listener, standin, terminated())
            .await
            .map_err(|e| format!("serving on {addr}: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_the_epoch_and_a_known_time() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_480_560_256_123), "2016-12-01T02:44:16.123000000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn form_decoding_handles_plus_and_percent() {
        assert_eq!(
            decode_form("order=priority+desc&filters=%5B%22a%22%5D&x&bad=%zz"),
            vec![
                ("order".to_string(), "priority desc".to_string()),
                ("filters".to_string(), "[\"a\"]".to_string()),
                ("x".to_string(), String::new()),
                ("bad".to_string(), "%zz".to_string()),
            ]
        );
    }

    #[test]
    fn workloads_parse_as_lists_or_objects_and_reject_bad_values() {
        let w = Workload::parse(
            "- {vcpus: 2, run_seconds: 0.5}\n- {uuid: zzzzz-dz642-abc, exit_code: 3}\n",
        )
        .expect("list form");
        assert_eq!(w.containers.len(), 2);
        assert_eq!(w.uuid_of(0), "zzzzz-dz642-000000000000000");
        assert_eq!(w.uuid_of(1), "zzzzz-dz642-abc");
        let w = Workload::parse(
            r#"{"cluster_id": "x1234", "max_dispatch_attempts": 2, "containers": [{}]}"#,
        )
        .expect("JSON object form");
        assert_eq!(w.uuid_of(0), "x1234-dz642-000000000000000");
        assert!(Workload::parse("- {vcpus: -1}").is_err());
        assert!(Workload::parse("- {run_seconds: .nan}").is_err());
        assert!(Workload::parse("- {uuid: a}\n- {uuid: a}").is_err());
        assert!(Workload::parse("- {colour: blue}").is_err());
    }

    #[test]
    fn filters_and_ordering_follow_the_api() {
        let w = Workload::parse(
            "- {priority: 5}\n- {priority: 9}\n- {priority: 0}\n- {priority: 9, uuid: zzzzz-dz642-aaaaaaaaaaaaaaa}\n",
        )
        .expect("workload");
        let s = StandIn::new(&w, "t", true);
        let mut p = BTreeMap::new();
        p.insert(
            "filters".into(),
            json!([["state", "=", "Queued"], ["priority", ">", "0"]]),
        );
        p.insert("order".into(), json!("priority desc"));
        p.insert("select".into(), json!(["uuid", "priority"]));
        p.insert("count".into(), json!("none"));
        let v = s.list(&p).expect("list");
        let got: Vec<(&str, i64)> = v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| {
                (
                    i["uuid"].as_str().expect("uuid"),
                    i["priority"].as_i64().expect("p"),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("zzzzz-dz642-000000000000001", 9),
                ("zzzzz-dz642-aaaaaaaaaaaaaaa", 9),
                ("zzzzz-dz642-000000000000000", 5)
            ]
        );
        assert!(v.get("items_available").is_none());
        assert_eq!(v["items"][0].as_object().map(Map::len), Some(2));
        p.insert(
            "filters".into(),
            json!([["uuid", "in", ["zzzzz-dz642-000000000000002"]]]),
        );
        p.insert("offset".into(), json!("0"));
        assert_eq!(
            s.list(&p).expect("list")["items"].as_array().map(Vec::len),
            Some(1)
        );
        p.insert("filters".into(), json!([["owner_uuid", "=", "x"]]));
        assert!(s.list(&p).is_err());
    }
}
