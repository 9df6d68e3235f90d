//! Test helper: a scripted EC2 Query endpoint on 127.0.0.1 that replies with the recorded
//! responses in `fixtures/ec2/` and records every request (form parameters and headers).
//!
//! A script chooses the reply (HTTP status and fixture file name) from the decoded request.
//! Dropping the server stops it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Call {
    /// The form parameters, decoded.
    pub params: BTreeMap<String, String>,
    /// The headers, by lower-case name (a repeated header keeps its last value).
    pub headers: BTreeMap<String, String>,
}

impl Call {
    /// The `Action` parameter ("" if missing).
    pub fn action(&self) -> &str {
        self.params.get("Action").map_or("", String::as_str)
    }

    /// The subnet of a RunInstances request ("" if none).
    pub fn subnet(&self) -> &str {
        self.params
            .get("NetworkInterface.1.SubnetId")
            .map_or("", String::as_str)
    }

    /// The value of header `name` (lower case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Chooses the reply (HTTP status and fixture file name) for a request.
pub type Script = Arc<dyn Fn(&Call) -> (u16, String) + Send + Sync>;

#[derive(Clone)]
struct Shared {
    script: Script,
    calls: Arc<Mutex<Vec<Call>>>,
}

/// An axum app served on 127.0.0.1 at a free port. Dropping it stops the server.
pub struct Loopback {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Loopback {
    /// Serves `app` until dropped.
    pub async fn serve(app: axum::Router) -> Loopback {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("loopback server");
        });
        Loopback { addr, task }
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A scripted EC2 endpoint on 127.0.0.1.
pub struct FixtureServer {
    /// The server.
    pub server: Loopback,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl FixtureServer {
    /// Starts a server that answers each request as `script` says.
    pub async fn start(script: impl Fn(&Call) -> (u16, String) + Send + Sync + 'static) -> Self {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared {
            script: Arc::new(script),
            calls: calls.clone(),
        };
        let app = axum::Router::new().fallback(handle).with_state(shared);
        FixtureServer {
            server: Loopback::serve(app).await,
            calls,
        }
    }

    /// The endpoint URL, for the `Endpoint` DriverParameter.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Every request so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls lock").clone()
    }

    /// The subnets of the RunInstances calls so far, in order.
    pub fn run_subnets(&self) -> Vec<String> {
        self.calls()
            .iter()
            .filter(|c| c.action() == "RunInstances")
            .map(|c| c.subnet().to_string())
            .collect()
    }
}

async fn handle(State(s): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let call = Call {
        params: parse_form(&body),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let (status, file) = (s.script)(&call);
    s.calls.lock().expect("calls lock").push(call);
    let text = fixture(&file);
    (
        StatusCode::from_u16(status).expect("status"),
        [(header::CONTENT_TYPE, "text/xml;charset=UTF-8")],
        text,
    )
        .into_response()
}

/// The text of `fixtures/ec2/<name>`.
pub fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/ec2")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
}

/// Decodes an `application/x-www-form-urlencoded` body.
pub fn parse_form(body: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect()
}
