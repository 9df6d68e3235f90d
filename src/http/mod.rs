//! The management API and `/metrics` (axum), as reference-scheduler.md §6 describes them.
//!
//! The production shell and this router share one `Arc<Mutex<Dispatcher>>`. A handler locks it
//! briefly, reads a getter or calls an admin method with the current time, releases it before any
//! `await`, and, after an admin call, wakes the shell (`wake.notify_one()`) so that it drains the
//! commands the call produced.
//!
//! Invariants:
//! * every route checks the management token first (an empty token answers 403
//!   `Management API authentication is not configured` on every route, `/metrics` included);
//! * bad or missing parameters answer 4xx with Go's exact JSON error bodies, never 5xx;
//! * a poisoned dispatcher mutex answers 500 with a message instead of panicking;
//! * the time handed to the core never goes backwards (the clock is clamped to the core's `now`);
//! * the management token never reaches a log line, an error or `Debug` output.

pub mod auth;
pub mod client;
pub mod metrics;
pub mod snapshot;
pub mod wire;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::{Body, Bytes, to_bytes};
use axum::extract::{Extension, Path, Request, State};
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::core::Dispatcher;
use crate::core::pool::AdminError;
use crate::core::time::Timestamp;

use auth::{Params, Verdict};
use metrics::LabelMemory;

/// The largest request body read (form parameters are small).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// How long a `/containers` body is served from the cache (Go's `schedQueueRefresh`).
pub const QUEUE_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The 403 body when the management token is empty.
pub const NOT_CONFIGURED: &str = "Management API authentication is not configured";

/// A source of the current time for the core (milliseconds since the Unix epoch in production).
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// A source of metric families beyond the dispatcher's (the cloud driver's `metrics`).
pub type MetricsSource = Arc<dyn Fn() -> Vec<metrics::Family> + Send + Sync>;

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    /// The dispatcher, shared with the shell that drives it.
    pub dispatcher: Arc<Mutex<Dispatcher>>,
    /// Notified after every admin call, so the shell drains the new commands.
    pub wake: Arc<tokio::sync::Notify>,
    /// `ManagementToken` ("" disables the API). Never logged.
    pub management_token: String,
    /// The current time.
    pub clock: Clock,
    /// Metric label values seen by earlier scrapes.
    memory: Arc<Mutex<LabelMemory>>,
    /// Families appended to the dispatcher's on each scrape (the cloud driver's).
    extra_metrics: Option<MetricsSource>,
    /// The last `/containers` body and when it was built (Go's `schedQueueRefresh`).
    queue_cache: Arc<Mutex<Option<(Timestamp, Bytes)>>>,
}

impl ApiState {
    /// The state for [`router`].
    pub fn new(
        dispatcher: Arc<Mutex<Dispatcher>>,
        wake: Arc<tokio::sync::Notify>,
        management_token: String,
        clock: Clock,
    ) -> ApiState {
        ApiState {
            dispatcher,
            wake,
            management_token,
            clock,
            memory: Arc::default(),
            queue_cache: Arc::default(),
            extra_metrics: None,
        }
    }

    /// Appends the families `source` returns to every `/metrics` and `/metrics.json` answer
    /// (the shell passes its cloud driver's `InstanceSet::metrics`).
    pub fn with_extra_metrics(mut self, source: MetricsSource) -> ApiState {
        self.extra_metrics = Some(source);
        self
    }

    /// A clock reading the system time, for production.
    pub fn system_clock() -> Clock {
        Arc::new(|| {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(crate::core::time::millis)
                .unwrap_or(0);
            Timestamp(ms)
        })
    }
}

impl fmt::Debug for ApiState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiState")
            .field("management_token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The management API: every route of reference-scheduler.md §6, and the what-if snapshot
/// (`snapshot`), behind the token check.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/arvados/v1/dispatch/containers", get(containers))
        .route("/arvados/v1/dispatch/container", get(container))
        .route("/arvados/v1/dispatch/containers/kill", post(kill_container))
        .route("/arvados/v1/dispatch/instances", get(instances))
        .route("/arvados/v1/dispatch/instances/hold", post(hold))
        .route("/arvados/v1/dispatch/instances/drain", post(drain))
        .route("/arvados/v1/dispatch/instances/run", post(run))
        .route("/arvados/v1/dispatch/instances/kill", post(kill_instance))
        .route(snapshot::PATH, get(snapshot::get_snapshot))
        .route("/metrics", get(metrics_text))
        .route("/metrics.json", get(metrics_json))
        .route("/_health/{check}", get(health))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

// ----- responses ----------------------------------------------------------------------------

/// A plain-text response as Go's `http.Error` writes it (with a final newline).
fn text(status: StatusCode, msg: &str) -> Response {
    let mut r = (status, format!("{msg}\n")).into_response();
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// A JSON response as Go's `json.Encoder` writes it (with a final newline).
fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut body = v.to_string();
    body.push('\n');
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `{"errors":[msg]}`, as Go's `httpserver.Error`.
fn error(status: StatusCode, msg: &str) -> Response {
    json_response(status, &json!({ "errors": [msg] }))
}

/// 200 with an empty body.
fn ok_empty() -> Response {
    StatusCode::OK.into_response()
}

// ----- shared steps -------------------------------------------------------------------------

/// Reads the body, gathers the parameters and checks the token before any route runs.
async fn guard(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let bytes: Bytes = match to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body larger than {MAX_BODY_BYTES} bytes or unreadable"),
            );
        }
    };
    let is_form = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|ct| {
            ct.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    let params = Params::parse(parts.uri.query(), is_form.then_some(&bytes[..]));
    let tokens = auth::request_tokens(&parts.headers, &params);
    match auth::check(&st.management_token, &tokens) {
        Verdict::Allowed => {}
        Verdict::NotConfigured => return text(StatusCode::FORBIDDEN, NOT_CONFIGURED),
        Verdict::Unauthorized => return text(StatusCode::UNAUTHORIZED, "Unauthorized"),
        Verdict::Forbidden => return text(StatusCode::FORBIDDEN, "Forbidden"),
    }
    parts.extensions.insert(params);
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// A mutex poisoned by a panicking thread: answered with a 500 and the message.
#[derive(Clone, Copy, Debug)]
struct Poisoned(&'static str);

impl IntoResponse for Poisoned {
    fn into_response(self) -> Response {
        error(StatusCode::INTERNAL_SERVER_ERROR, self.0)
    }
}

/// Locks the dispatcher; a poisoned lock becomes a 500 with a message.
fn lock(st: &ApiState) -> Result<MutexGuard<'_, Dispatcher>, Poisoned> {
    st.dispatcher.lock().map_err(|_| {
        Poisoned("dispatcher state is unavailable: a thread panicked while holding its lock")
    })
}

/// The time for a call into the core: the clock, never earlier than the core's last time.
fn now(st: &ApiState, d: &Dispatcher) -> Timestamp {
    (st.clock)().max(d.now())
}

fn admin_error(e: AdminError) -> Response {
    error(StatusCode::NOT_FOUND, &e.to_string())
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "404 page not found")
}

// ----- containers ---------------------------------------------------------------------------

/// The scheduler queue. The body is rebuilt at most once per [`QUEUE_CACHE_TTL`], as Go
/// rebuilds its snapshot, so that frequent callers do not copy a large queue each time.
async fn containers(State(st): State<ApiState>) -> Response {
    let t = (st.clock)();
    let cached = st.queue_cache.lock().ok().and_then(|c| {
        c.as_ref()
            .filter(|(at, _)| t >= *at && t < *at + QUEUE_CACHE_TTL)
            .map(|(_, body)| body.clone())
    });
    let body = match cached {
        Some(body) => body,
        None => {
            let (items, types) = {
                let d = match lock(&st) {
                    Ok(d) => d,
                    Err(p) => return p.into_response(),
                };
                (d.scheduler_queue(), d.types().clone())
            };
            let mut text = wire::queue_list(items.as_deref(), &types).to_string();
            text.push('\n');
            let body = Bytes::from(text);
            // Only a first pass's queue is worth caching: before it, the list is null.
            if items.is_some()
                && let Ok(mut c) = st.queue_cache.lock()
            {
                *c = Some((t, body.clone()));
            }
            body
        }
    };
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn container(State(st): State<ApiState>, Extension(p): Extension<Params>) -> Response {
    let uuid = p.get("container_uuid").unwrap_or_default();
    let (item, types) = {
        let d = match lock(&st) {
            Ok(d) => d,
            Err(p) => return p.into_response(),
        };
        (d.scheduler_queue_item(uuid), d.types().clone())
    };
    match item {
        Some(item) => json_response(StatusCode::OK, &wire::queue_item(&item, &types)),
        None => error(StatusCode::NOT_FOUND, "container not found"),
    }
}

async fn kill_container(State(st): State<ApiState>, Extension(p): Extension<Params>) -> Response {
    let Some(uuid) = p.get("container_uuid") else {
        return error(
            StatusCode::BAD_REQUEST,
            "container_uuid parameter not provided",
        );
    };
    let reason = p.get("reason").unwrap_or_default();
    let result = {
        let mut d = match lock(&st) {
            Ok(d) => d,
            Err(p) => return p.into_response(),
        };
        let t = now(&st, &d);
        d.kill_container(t, uuid, reason)
    };
    st.wake.notify_one();
    match result {
        Ok(()) => ok_empty(),
        Err(e) => admin_error(e),
    }
}

// ----- instances ----------------------------------------------------------------------------

async fn instances(State(st): State<ApiState>) -> Response {
    let views = match lock(&st) {
        Ok(d) => d.instances(),
        Err(p) => return p.into_response(),
    };
    json_response(StatusCode::OK, &wire::instance_list(&views))
}

/// An instance action: `hold`, `drain`, `run` or `kill`.
#[derive(Clone, Copy, Debug)]
enum InstanceAction {
    Hold,
    Drain,
    Run,
    Kill,
}

fn instance_action(st: &ApiState, p: &Params, action: InstanceAction) -> Response {
    let Some(id) = p.get("instance_id") else {
        return error(
            StatusCode::BAD_REQUEST,
            "instance_id parameter not provided",
        );
    };
    let result = {
        let mut d = match lock(st) {
            Ok(d) => d,
            Err(p) => return p.into_response(),
        };
        let t = now(st, &d);
        match action {
            InstanceAction::Hold => d.hold_instance(t, id),
            InstanceAction::Drain => d.drain_instance(t, id),
            InstanceAction::Run => d.run_instance(t, id),
            InstanceAction::Kill => d.kill_instance(t, id, p.get("reason").unwrap_or_default()),
        }
    };
    st.wake.notify_one();
    match result {
        Ok(()) => ok_empty(),
        Err(e) => admin_error(e),
    }
}

async fn hold(State(st): State<ApiState>, Extension(p): Extension<Params>) -> Response {
    instance_action(&st, &p, InstanceAction::Hold)
}

async fn drain(State(st): State<ApiState>, Extension(p): Extension<Params>) -> Response {
    instance_action(&st, &p, InstanceAction::Drain)
}

async fn run(State(st): State<ApiState>, Extension(p): Extension<Params>) -> Response {
    instance_action(&st, &p, InstanceAction::Run)
}

async fn kill_instance(State(st): State<ApiState>, Extension(p): Extension<Params>) -> Response {
    instance_action(&st, &p, InstanceAction::Kill)
}

// ----- metrics and health -------------------------------------------------------------------

fn gather(st: &ApiState) -> Result<Vec<metrics::Family>, Poisoned> {
    // The driver's families first, without holding the dispatcher's lock.
    let extra = st.extra_metrics.as_ref().map(|f| f()).unwrap_or_default();
    let mut families = {
        let d = lock(st)?;
        let mut memory = st.memory.lock().map_err(|_| {
            Poisoned("metrics state is unavailable: a thread panicked while holding its lock")
        })?;
        let t = now(st, &d);
        metrics::gather(&d, t, &mut memory)
    };
    metrics::append_families(&mut families, extra);
    Ok(families)
}

async fn metrics_text(State(st): State<ApiState>) -> Response {
    match gather(&st) {
        Ok(f) => {
            let mut r = (StatusCode::OK, metrics::encode_text(&f)).into_response();
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(metrics::TEXT_CONTENT_TYPE),
            );
            r
        }
        Err(p) => p.into_response(),
    }
}

async fn metrics_json(State(st): State<ApiState>) -> Response {
    match gather(&st) {
        Ok(f) => json_response(StatusCode::OK, &metrics::encode_json(&f)),
        Err(p) => p.into_response(),
    }
}

async fn health(
    State(st): State<ApiState>,
    Path(check): Path<String>,
    headers: HeaderMap,
) -> Response {
    // The health handler's own rule, after the router's: only the exact header counts.
    match auth::check_health(&st.management_token, &headers) {
        Verdict::Allowed => {}
        Verdict::NotConfigured => return text(StatusCode::NOT_FOUND, "disabled"),
        Verdict::Unauthorized => {
            return text(StatusCode::UNAUTHORIZED, "authorization required");
        }
        Verdict::Forbidden => return text(StatusCode::FORBIDDEN, "authorization error"),
    }
    if check != "ping" {
        return text(StatusCode::NOT_FOUND, "404 page not found");
    }
    let load_error = match lock(&st) {
        Ok(d) => d.pool().runner().load_error.clone(),
        Err(p) => return p.into_response(),
    };
    let body = match load_error {
        None => json!({"health": "OK"}),
        Some(e) => json!({"health": "ERROR", "error": e}),
    };
    json_response(StatusCode::OK, &body)
}
