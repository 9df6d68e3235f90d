//! `GET /arvados/v1/dispatch/snapshot`: the dispatcher's state for what-if simulations
//! (`dispatch-sim whatif --from URL`; format in docs/pricing.md, "What-if").
//!
//! The route sits behind the same management-token check as every other route (the router's
//! guard runs first). The handler locks the dispatcher only to build the snapshot (a copy of the
//! queue, the pool and the statistics) and serialises it after releasing the lock. The snapshot
//! is built from the core, which never holds a secret, and leaves instance tags out (they hold
//! each instance's secret), so no token, key or credential can reach the body.

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::{ApiState, error, lock, now};
use crate::core::snapshot;

/// The route's path.
pub const PATH: &str = "/arvados/v1/dispatch/snapshot";

/// The handler.
pub async fn get_snapshot(State(st): State<ApiState>) -> Response {
    let snap = {
        let d = match lock(&st) {
            Ok(d) => d,
            Err(p) => return p.into_response(),
        };
        let t = now(&st, &d);
        snapshot::build(&d, t)
    };
    match serde_json::to_string(&snap) {
        Ok(mut body) => {
            body.push('\n');
            let mut r = (StatusCode::OK, body).into_response();
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot serialise the snapshot: {e}"),
        ),
    }
}
