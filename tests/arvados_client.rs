//! The controller client against a recording stand-in on 127.0.0.1: the exact poll queries
//! (filters, order, limit, select, count, paging), the missing re-fetch, mounts, lock, unlock,
//! cancel and cancel-as-unsatisfiable requests and bodies, the Authorization header, the long
//! query method override, error mapping (503, 422, 404) and timeouts.

#![cfg(feature = "runtime")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arvados_dispatch_cloud::arvados::{Client, Params};
use arvados_dispatch_cloud::core::command::{ApiError, Command, CommandKind, Input, Tracked};
use arvados_dispatch_cloud::core::types::ContainerState;
use arvados_dispatch_cloud::core::{OpId, Timestamp};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::{Value, json};

const TOKEN: &str = "v2/zzzzz-gj3su-000000000000000/secret-token-do-not-log";
const ME: &str = "zzzzz-gj3su-000000000000000";

fn fixture(name: &str) -> String {
    let p = format!("{}/fixtures/arvados/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {p}: {e}"))
}

fn decode_form(s: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{s}"))
        .expect("a form body parses as a query")
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// One request as the stand-in saw it.
#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    raw_query: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: String,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The effective parameters: the query string, or the form body of a POST override or PUT.
    fn params(&self) -> Vec<(String, String)> {
        if self.method == "GET" {
            self.query.clone()
        } else {
            decode_form(&self.body)
        }
    }

    fn param(&self, k: &str) -> Option<String> {
        self.params()
            .into_iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v)
    }

    fn param_json(&self, k: &str) -> Option<Value> {
        self.param(k)
            .map(|v| serde_json::from_str(&v).unwrap_or_else(|e| panic!("{k}={v}: {e}")))
    }

    fn is_list(&self) -> bool {
        self.path == "/arvados/v1/containers"
    }
}

type Responder = Box<dyn Fn(&Req) -> (u16, String) + Send + Sync>;

struct Fake {
    log: Mutex<Vec<Req>>,
    respond: Responder,
}

async fn handle(
    State(fake): State<Arc<Fake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let raw_query = uri.query().unwrap_or("").to_string();
    let req = Req {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: decode_form(&raw_query),
        raw_query,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let (status, text) = (fake.respond)(&req);
    fake.log.lock().expect("log lock").push(req);
    (
        StatusCode::from_u16(status).expect("valid status"),
        [("content-type", "application/json")],
        text,
    )
}

/// Starts the stand-in; returns its URL and the shared log.
async fn serve(respond: Responder) -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake {
        log: Mutex::new(Vec::new()),
        respond,
    });
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (format!("http://{addr}"), fake)
}

fn log(fake: &Fake) -> Vec<Req> {
    fake.log.lock().expect("log lock").clone()
}

fn client(url: &str) -> Client {
    Client::new(url, TOKEN, false).expect("client")
}

fn select_json() -> Value {
    json!([
        "uuid",
        "state",
        "priority",
        "runtime_constraints",
        "container_image",
        "scheduling_parameters",
        "created_at"
    ])
}

fn list_of(uuids: &[&str]) -> String {
    let items: Vec<Value> = uuids
        .iter()
        .map(|u| {
            json!({"uuid": u, "state": "Locked", "priority": 1,
                   "runtime_constraints": {"vcpus": 1, "ram": 1}, "created_at": "2016-12-01T00:00:00Z"})
        })
        .collect();
    json!({"kind": "arvados#containerList", "items": items}).to_string()
}

/// Answers the token lookup, the two lists (one page each, then empty) and mounts.
fn standard(req: &Req) -> (u16, String) {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/arvados/v1/api_client_authorizations/current") => {
            (200, fixture("api_client_authorization_current.json"))
        }
        ("GET", "/arvados/v1/containers") => {
            let filters = req.param("filters").unwrap_or_default();
            if filters.contains("\"state\"") {
                if req.param("offset").is_none() {
                    (200, fixture("container_list_avail.json"))
                } else {
                    (200, fixture("container_list_empty.json"))
                }
            } else if filters.contains("locked_by_uuid") {
                if filters.contains("\">\"") {
                    (200, fixture("container_list_empty.json"))
                } else {
                    (200, fixture("container_list_mine.json"))
                }
            } else {
                (200, fixture("container_list_empty.json"))
            }
        }
        ("GET", p) if p.starts_with("/arvados/v1/containers/") => {
            (200, fixture("container_mounts.json"))
        }
        _ => (404, fixture("error_404.json")),
    }
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("the test finished within its generous deadline")
}

/// The poll command's `tracked` records for a queue that knows `known` and still waits for
/// `missing` (unfinished): in UUID order, the missing ones Queued, the others Complete.
fn tracked(known: &[String], missing: &[String]) -> Vec<Tracked> {
    let all: std::collections::BTreeSet<&String> = known.iter().chain(missing).collect();
    all.into_iter()
        .map(|u| {
            let state = if missing.contains(u) {
                ContainerState::Queued
            } else {
                ContainerState::Complete
            };
            Tracked {
                uuid: u.as_str().into(),
                state,
            }
        })
        .collect()
}

#[tokio::test]
async fn poll_sends_the_go_queries_and_pages() {
    within(async {
        let (url, fake) = serve(Box::new(standard)).await;
        let c = client(&url);
        let known = vec!["zzzzz-dz642-queuedsupervisr".to_string()];
        let r = c.poll(&tracked(&known, &[])).await.expect("poll succeeds");

        let reqs = log(&fake);
        for r in &reqs {
            assert_eq!(
                r.header("authorization"),
                Some(format!("Bearer {TOKEN}").as_str())
            );
        }
        assert_eq!(
            reqs[0].path,
            "/arvados/v1/api_client_authorizations/current"
        );
        // The two lists run concurrently: "avail" requests first, then "mine", each in order.
        let is_avail = |r: &&Req| r.param("filters").is_some_and(|f| f.contains("Queued"));
        let mut lists: Vec<&Req> = reqs
            .iter()
            .filter(|r| r.is_list())
            .filter(is_avail)
            .collect();
        lists.extend(reqs.iter().filter(|r| r.is_list() && !is_avail(r)));
        assert_eq!(lists.len(), 4, "{lists:#?}");
        // "avail": first page, then the next offset.
        let a0 = lists[0];
        assert_eq!(a0.method, "GET");
        assert_eq!(
            a0.param_json("filters"),
            Some(json!([["state", "=", "Queued"], ["priority", ">", "0"]]))
        );
        assert_eq!(a0.param("order").as_deref(), Some("priority desc"));
        assert_eq!(a0.param("limit").as_deref(), Some("1000"));
        assert_eq!(a0.param("count").as_deref(), Some("none"));
        assert_eq!(a0.param("offset"), None, "offset=0 is omitted");
        assert_eq!(a0.param_json("select"), Some(select_json()));
        // Keys are sorted as Go's url.Values.Encode sends them.
        let keys: Vec<String> = a0.query.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(keys, vec!["count", "filters", "limit", "order", "select"]);
        assert!(
            a0.raw_query.contains("order=priority+desc"),
            "{}",
            a0.raw_query
        );
        assert_eq!(lists[1].param("offset").as_deref(), Some("2"));
        assert_eq!(lists[1].param_json("filters"), a0.param_json("filters"));
        // "mine": keyset paging on uuid.
        let m0 = lists[2];
        assert_eq!(
            m0.param_json("filters"),
            Some(json!([["locked_by_uuid", "=", ME]]))
        );
        assert_eq!(m0.param("order").as_deref(), Some("uuid"));
        assert_eq!(m0.param("limit").as_deref(), Some("1000"));
        assert_eq!(m0.param_json("select"), Some(select_json()));
        assert_eq!(
            lists[3].param_json("filters"),
            Some(json!([
                ["locked_by_uuid", "=", ME],
                ["uuid", ">", "zzzzz-dz642-lockedcontainer"]
            ]))
        );
        // Mounts for the two containers not in `known`.
        let mut mounts: Vec<String> = reqs
            .iter()
            .filter(|r| r.path.starts_with("/arvados/v1/containers/"))
            .map(|r| {
                assert_eq!(r.param_json("select"), Some(json!(["mounts"])));
                r.path.clone()
            })
            .collect();
        mounts.sort();
        assert_eq!(
            mounts,
            vec![
                "/arvados/v1/containers/zzzzz-dz642-lockedcontainer",
                "/arvados/v1/containers/zzzzz-dz642-queuedcontainer"
            ]
        );

        let uuids: Vec<&str> = r.containers.iter().map(|c| c.uuid.as_str()).collect();
        assert_eq!(
            uuids,
            vec![
                "zzzzz-dz642-queuedcontainer",
                "zzzzz-dz642-queuedsupervisr",
                "zzzzz-dz642-lockedcontainer"
            ],
            "avail first, then mine"
        );
        let q = &r.containers[0];
        assert_eq!(q.state, ContainerState::Queued);
        assert_eq!(q.priority, 562948349145881771);
        assert_eq!(q.runtime_constraints.vcpus, 4);
        assert_eq!(q.runtime_constraints.ram, 12_000_000_000);
        assert_eq!(q.created_at, Timestamp(1_480_560_256_123));
        assert_eq!(
            q.mounts.as_ref().expect("mounts of a new container")["/tmp"].capacity,
            24_000_000_000
        );
        assert!(r.containers[1].scheduling_parameters.supervisor);
        assert!(r.containers[1].scheduling_parameters.preemptible);
        assert_eq!(r.containers[1].mounts, None, "known: no mounts fetched");
        assert_eq!(r.containers[2].state, ContainerState::Locked);
        assert!(r.deleted.is_empty() && r.mounts_errors.is_empty());
    })
    .await
}

#[tokio::test]
async fn keyset_paging_continues_past_short_pages_and_stops_at_an_empty_one() {
    within(async {
        let (url, fake) = serve(Box::new(|req: &Req| {
            if !req.is_list() {
                return standard(req);
            }
            let f = req.param_json("filters").expect("filters");
            if f[0][0] == "state" {
                return (200, fixture("container_list_empty.json"));
            }
            let after = f.get(1).map(|t| t[2].as_str().unwrap_or("").to_string());
            let page: &[&str] = match after.as_deref() {
                None => &["zzzzz-dz642-a00000000000001", "zzzzz-dz642-a00000000000002"],
                Some("zzzzz-dz642-a00000000000002") => &["zzzzz-dz642-b00000000000001"],
                Some("zzzzz-dz642-b00000000000001") => &["zzzzz-dz642-c00000000000001"],
                _ => &[],
            };
            (200, list_of(page))
        }))
        .await;
        let c = client(&url);
        let all: Vec<String> = ([
            "a00000000000001",
            "a00000000000002",
            "b00000000000001",
            "c00000000000001",
        ])
        .iter()
        .map(|s| format!("zzzzz-dz642-{s}"))
        .collect();
        let r = c.poll(&tracked(&all, &[])).await.expect("poll");
        let got: Vec<String> = r.containers.iter().map(|c| c.uuid.to_string()).collect();
        assert_eq!(got, all);
        let mine: Vec<Req> = log(&fake)
            .into_iter()
            .filter(|r| r.is_list() && r.param("filters").is_some_and(|f| f.contains("locked_by")))
            .collect();
        assert_eq!(mine.len(), 4, "three short pages and one empty page");
        // Each page adds the keyset filter to the original filters only.
        for m in &mine[1..] {
            assert_eq!(
                m.param_json("filters")
                    .expect("filters")
                    .as_array()
                    .map(Vec::len),
                Some(2)
            );
        }
    })
    .await
}

#[tokio::test]
async fn avail_paging_stops_after_a_hundred_non_supervisors() {
    within(async {
        let (url, fake) = serve(Box::new(|req: &Req| {
            if !req.is_list() {
                return standard(req);
            }
            let f = req.param("filters").expect("filters");
            if !f.contains("Queued") {
                return (200, fixture("container_list_empty.json"));
            }
            let offset: usize = req.param("offset").map_or(0, |o| o.parse().expect("offset"));
            // Pages of 60 (the server may cut pages short): the second page reaches 120.
            let items: Vec<Value> = (offset..offset + 60)
                .map(|i| json!({"uuid": format!("zzzzz-dz642-{i:015}"), "state": "Queued", "priority": 1000 - i as i64}))
                .collect();
            (200, json!({"kind": "arvados#containerList", "items": items}).to_string())
        }))
        .await;
        let c = client(&url);
        let known: Vec<String> = (0..200).map(|i| format!("zzzzz-dz642-{i:015}")).collect();
        let r = c.poll(&tracked(&known, &[])).await.expect("poll");
        assert_eq!(r.containers.len(), 120);
        let avail: Vec<Option<String>> = log(&fake)
            .iter()
            .filter(|r| r.is_list() && r.param("filters").is_some_and(|f| f.contains("Queued")))
            .map(|r| r.param("offset"))
            .collect();
        assert_eq!(avail, vec![None, Some("60".to_string())]);
    })
    .await
}

#[tokio::test]
async fn missing_uuids_are_refetched_in_batches_and_empty_batches_mean_deleted() {
    within(async {
        let (url, fake) = serve(Box::new(|req: &Req| {
            if !req.is_list() {
                return standard(req);
            }
            let f = req.param_json("filters").expect("filters");
            if f[0][0] != "uuid" {
                return (200, fixture("container_list_empty.json"));
            }
            if f.as_array().map(Vec::len) == Some(2) {
                return (200, fixture("container_list_empty.json"));
            }
            let batch: Vec<String> = f[0][2]
                .as_array()
                .expect("uuid list")
                .iter()
                .map(|v| v.as_str().expect("uuid").to_string())
                .collect();
            let alive: Vec<&str> = batch
                .iter()
                .map(String::as_str)
                .filter(|u| u.ends_with('1') || u.ends_with('3'))
                .collect();
            (200, list_of(&alive))
        }))
        .await;
        let c = client(&url);
        // 22 missing: batch one (20) returns the alive ones; the rest are retried.
        let missing: Vec<String> = (0..22).map(|i| format!("zzzzz-dz642-{i:015}")).collect();
        let r = c.poll(&tracked(&missing, &missing)).await.expect("poll");
        let mut got: Vec<String> = r.containers.iter().map(|c| c.uuid.to_string()).collect();
        got.sort();
        let alive: Vec<String> = missing
            .iter()
            .filter(|u| u.ends_with('1') || u.ends_with('3'))
            .cloned()
            .collect();
        assert_eq!(got, alive);
        let mut deleted = r.deleted.clone();
        deleted.sort();
        let gone: Vec<String> = missing
            .iter()
            .filter(|u| !alive.contains(u))
            .cloned()
            .collect();
        assert_eq!(deleted, gone);
        let batches: Vec<Req> = log(&fake)
            .into_iter()
            .filter(|r| {
                r.is_list()
                    && r.param_json("filters")
                        .is_some_and(|f| f[0][0] == "uuid" && f.as_array().map(Vec::len) == Some(1))
            })
            .collect();
        assert!(batches.len() >= 2);
        for b in &batches {
            let f = b.param_json("filters").expect("filters");
            let n = f[0][2].as_array().expect("list").len();
            assert!((1..=20).contains(&n), "batch of {n}");
            assert_eq!(f[0][1], "in");
            assert_eq!(b.param("order").as_deref(), Some("uuid"));
            assert_eq!(b.param("limit"), None, "no limit on the missing re-fetch");
        }
        assert_eq!(
            batches[0].param_json("filters").expect("f")[0][2]
                .as_array()
                .map(Vec::len),
            Some(20)
        );
    })
    .await
}

#[tokio::test]
async fn a_refetch_returning_unrequested_records_fails_the_poll() {
    within(async {
        let (url, _fake) = serve(Box::new(|req: &Req| {
            if !req.is_list() {
                return standard(req);
            }
            let f = req.param("filters").expect("filters");
            if f.contains("\"in\"") && !f.contains("\">\"") {
                return (200, list_of(&["zzzzz-dz642-somethingelse00"]));
            }
            (200, fixture("container_list_empty.json"))
        }))
        .await;
        let c = client(&url);
        let e = c
            .poll(&tracked(&[], &["zzzzz-dz642-000000000000001".to_string()]))
            .await
            .expect_err("mismatch");
        assert!(
            e.to_string()
                .starts_with("BUG? server response did not match requested filters"),
            "{e}"
        );
    })
    .await
}

#[tokio::test]
async fn invalid_mounts_are_reported_with_the_go_phrase() {
    within(async {
        let (url, _fake) = serve(Box::new(|req: &Req| {
            if req.path == "/arvados/v1/containers/zzzzz-dz642-queuedcontainer" {
                return (200, fixture("container_mounts_invalid.json"));
            }
            if req.path == "/arvados/v1/containers/zzzzz-dz642-lockedcontainer" {
                return (500, fixture("error_422.json"));
            }
            standard(req)
        }))
        .await;
        let r = client(&url).poll(&tracked(&[], &[])).await.expect("poll");
        assert_eq!(r.containers.len(), 3, "records stay; the core skips them");
        let errs: Vec<&str> = r.mounts_errors.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(
            errs,
            vec!["zzzzz-dz642-lockedcontainer", "zzzzz-dz642-queuedcontainer"]
        );
        assert!(
            r.mounts_errors[1].1.contains("json: cannot unmarshal"),
            "{:?}",
            r.mounts_errors
        );
        assert!(
            r.mounts_errors[0].1.contains("HTTP 500"),
            "{:?}",
            r.mounts_errors
        );
    })
    .await
}

#[tokio::test]
async fn lock_unlock_and_cancel_send_the_documented_requests() {
    within(async {
        let (url, fake) = serve(Box::new(|req: &Req| match req.method.as_str() {
            "POST" | "PUT" => (200, fixture("lock_response.json")),
            _ => standard(req),
        }))
        .await;
        let c = client(&url);
        let u = "zzzzz-dz642-queuedcontainer";
        let up = c.lock(u).await.expect("lock");
        assert_eq!(up.state, ContainerState::Locked);
        assert_eq!(up.priority, 562948349145881771);
        assert_eq!(up.locked_by_uuid.as_deref(), Some(ME));
        c.unlock(u).await.expect("unlock");
        c.cancel(u).await.expect("cancel");
        let reqs = log(&fake);
        assert_eq!(reqs[0].method, "POST");
        assert_eq!(reqs[0].path, format!("/arvados/v1/containers/{u}/lock"));
        assert_eq!(reqs[0].body, "");
        assert_eq!(reqs[1].method, "POST");
        assert_eq!(reqs[1].path, format!("/arvados/v1/containers/{u}/unlock"));
        assert_eq!(reqs[2].method, "PUT");
        assert_eq!(reqs[2].path, format!("/arvados/v1/containers/{u}"));
        assert_eq!(
            reqs[2].header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(
            decode_form(&reqs[2].body),
            vec![(
                "container".to_string(),
                r#"{"state":"Cancelled"}"#.to_string()
            )]
        );
        for r in &reqs {
            assert_eq!(
                r.header("authorization"),
                Some(format!("Bearer {TOKEN}").as_str())
            );
        }
    })
    .await
}

#[tokio::test]
async fn cancel_unsatisfiable_locks_records_the_error_and_cancels() {
    within(async {
        let (url, fake) = serve(Box::new(|req: &Req| match req.method.as_str() {
            "POST" | "PUT" => (200, fixture("lock_response.json")),
            _ => standard(req),
        }))
        .await;
        let c = client(&url);
        let u = "zzzzz-dz642-queuedcontainer";
        let cmd = Command {
            op: OpId(7),
            deadline: Timestamp(0),
            kind: CommandKind::CancelUnsatisfiable {
                uuid: u.into(),
                lock_first: true,
                message: "no suitable instance type".into(),
            },
        };
        let input = c
            .execute(&cmd, Duration::from_secs(30))
            .await
            .expect("an API command");
        assert_eq!(
            input,
            Input::UnsatisfiableCancelled {
                op: OpId(7),
                result: Ok(())
            }
        );
        let reqs = log(&fake);
        assert_eq!(reqs.len(), 3);
        assert_eq!(
            (reqs[0].method.as_str(), reqs[0].path.as_str()),
            (
                "POST",
                "/arvados/v1/containers/zzzzz-dz642-queuedcontainer/lock"
            )
        );
        assert_eq!(
            decode_form(&reqs[1].body),
            vec![
                (
                    "container".to_string(),
                    r#"{"runtime_status":{"error":"no suitable instance type"}}"#.to_string()
                ),
                ("select".to_string(), r#"["uuid"]"#.to_string()),
            ]
        );
        assert_eq!(
            decode_form(&reqs[2].body),
            vec![
                (
                    "container".to_string(),
                    r#"{"state":"Cancelled"}"#.to_string()
                ),
                ("select".to_string(), r#"["uuid"]"#.to_string()),
            ]
        );
    })
    .await
}

#[tokio::test]
async fn a_503_reaches_the_core_as_an_api_error_with_its_status() {
    within(async {
        let (url, _fake) = serve(Box::new(|_req: &Req| (503, fixture("error_503.html")))).await;
        let c = client(&url);
        assert_eq!(c.last_503(), None);
        assert_eq!(c.concurrency_limit(), 8);
        let cmd = Command {
            op: OpId(3),
            deadline: Timestamp(0),
            kind: CommandKind::Lock {
                uuid: "zzzzz-dz642-queuedcontainer".into(),
            },
        };
        let Some(Input::ContainerUpdated { op, result: Err(e) }) =
            c.execute(&cmd, Duration::from_secs(30)).await
        else {
            panic!("expected a failed ContainerUpdated");
        };
        assert_eq!(op, OpId(3));
        assert!(e.is_503(), "{e:?}");
        assert!(c.last_503().is_some(), "the 503 is remembered");
        assert_eq!(c.concurrency_limit(), 4, "a 503 halves the limit");
        assert!(e.message.contains("/lock"), "{e}");
        let poll = Command {
            op: OpId(4),
            deadline: Timestamp(0),
            kind: CommandKind::PollQueue { tracked: vec![] },
        };
        let Some(Input::QueuePolled { result: Err(e), .. }) =
            c.execute(&poll, Duration::from_secs(30)).await
        else {
            panic!("expected a failed poll");
        };
        assert!(e.is_503(), "{e:?}");
        assert!(!e.message.contains("secret-token"), "{e}");
    })
    .await
}

#[tokio::test]
async fn error_bodies_become_messages_with_status() {
    within(async {
        let (url, _fake) = serve(Box::new(|req: &Req| {
            if req.path.ends_with("/lock") {
                (422, fixture("error_422.json"))
            } else {
                (404, fixture("error_404.json"))
            }
        }))
        .await;
        let c = client(&url);
        let e = c
            .lock("zzzzz-dz642-runningcontainr")
            .await
            .expect_err("422");
        assert_eq!(e.status(), Some(422));
        let api: ApiError = e.into();
        assert!(api.message.contains("cannot lock when Running"), "{api}");
        assert!(
            api.message
                .contains("POST arvados/v1/containers/zzzzz-dz642-runningcontainr/lock"),
            "{api}"
        );
        let e = c
            .unlock("zzzzz-dz642-nosuchcontainer")
            .await
            .expect_err("404");
        assert_eq!(e.status(), Some(404));
        assert!(e.to_string().contains("Path not found"), "{e}");
    })
    .await
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    within(async {
        // Accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let held = Arc::new(Mutex::new(Vec::new()));
        let h = held.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                h.lock().expect("lock").push(s);
            }
        });
        let c = client(&format!("http://{addr}"));
        let cmd = Command {
            op: OpId(9),
            deadline: Timestamp(0),
            kind: CommandKind::Unlock {
                uuid: "zzzzz-dz642-queuedcontainer".into(),
            },
        };
        let Some(Input::ContainerUpdated { result: Err(e), .. }) =
            c.execute(&cmd, Duration::from_millis(300)).await
        else {
            panic!("expected a timeout");
        };
        assert_eq!(e.status, None);
        assert!(e.message.contains("timed out"), "{e}");
        // The per-request timeout of the client applies too.
        let short = Client::with_timeout(
            &format!("http://{addr}"),
            TOKEN,
            false,
            Duration::from_millis(300),
        )
        .expect("client");
        let e = short
            .lock("zzzzz-dz642-queuedcontainer")
            .await
            .expect_err("timeout");
        assert!(e.to_string().contains("timed out"), "{e}");
    })
    .await
}

#[tokio::test]
async fn long_queries_become_a_post_with_a_method_override() {
    within(async {
        let (url, fake) = serve(Box::new(|_req: &Req| {
            (200, fixture("container_list_empty.json"))
        }))
        .await;
        let c = client(&url);
        let uuids: Vec<String> = (0..60).map(|i| format!("zzzzz-dz642-{i:015}")).collect();
        let mut p = Params::new();
        p.set("filters", json!([["uuid", "in", uuids]]))
            .set("order", json!("uuid"));
        assert!(p.encode().len() >= 1000);
        c.request(reqwest::Method::GET, "arvados/v1/containers", &p)
            .await
            .expect("request");
        let mut small = Params::new();
        small.set("order", json!("uuid"));
        c.request(reqwest::Method::GET, "arvados/v1/containers", &small)
            .await
            .expect("request");
        let reqs = log(&fake);
        assert_eq!(reqs[0].method, "POST");
        assert_eq!(reqs[0].header("x-http-method-override"), Some("GET"));
        assert_eq!(reqs[0].raw_query, "");
        assert_eq!(
            reqs[0].param_json("filters"),
            Some(json!([["uuid", "in", uuids]]))
        );
        assert_eq!(reqs[1].method, "GET");
        assert_eq!(reqs[1].raw_query, "order=uuid");
    })
    .await
}

#[test]
fn the_token_never_appears_in_debug_output_or_url_errors() {
    let c = Client::new("https://controller.example:443", TOKEN, true).expect("client");
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("secret-token"), "{dbg}");
    assert!(dbg.contains("[redacted]"));
    let e = Client::new("ftp://x", TOKEN, false).expect_err("scheme");
    assert!(e.to_string().contains("ftp://x"), "{e}");
    assert!(!e.to_string().contains("secret"), "{e}");
    assert!(Client::new("https://h", "", false).is_err());
    let host = |u: &str| Client::new(u, TOKEN, false).expect("client").api_host();
    assert_eq!(host("https://zzzzz.example:8443/"), "zzzzz.example:8443");
    assert_eq!(host("https://zzzzz.example"), "zzzzz.example");
    assert_eq!(host("http://127.0.0.1:9"), "http://127.0.0.1:9");
}

#[test]
fn params_follow_go_encoding() {
    let mut p = Params::new();
    p.set("select", json!(["uuid"]))
        .set("offset", json!(0))
        .set("include_trash", json!(false))
        .set("x", Value::Null)
        .set("limit", json!(1000))
        .set("order", json!("priority desc"));
    assert_eq!(
        p.encode(),
        "limit=1000&order=priority+desc&select=%5B%22uuid%22%5D"
    );
}

/// `dispatch-sim controller` from this target directory, built on demand.
fn dispatch_sim_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("DISPATCH_SIM_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("test binary in target/<profile>/deps")
        .to_path_buf();
    let bin = profile_dir.join("dispatch-sim");
    if !bin.exists() {
        let target = profile_dir.parent().expect("target dir");
        let status = std::process::Command::new(env!("CARGO"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "-p", "dispatch-sim", "--bin", "dispatch-sim"])
            .env("CARGO_TARGET_DIR", target)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building dispatch-sim failed");
    }
    bin
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_and_the_standin_controller_agree() {
    within(async {
        use std::io::BufRead;
        let dir =
            std::env::temp_dir().join(format!("arvados-client-standin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let w = dir.join("workload.yaml");
        let mut text = String::from("max_dispatch_attempts: 3\ncontainers:\n");
        for i in 0..130 {
            text.push_str(&format!(
                "  - {{priority: {}, scratch: 1000, supervisor: {}}}\n",
                i + 1,
                i % 10 == 0
            ));
        }
        std::fs::write(&w, text).expect("workload");
        let mut child = std::process::Command::new(dispatch_sim_bin())
            .args([
                "controller",
                "--quiet",
                "--listen",
                "127.0.0.1:0",
                "--token",
                TOKEN,
                "--workload",
            ])
            .arg(&w)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start dispatch-sim controller");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("address line");
        let _guard = Killed(child);
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .expect("address")
            .to_string();
        let c = client(&format!("http://{addr}"));
        let uuid = |i: usize| format!("zzzzz-dz642-{i:015}");

        let r = c.poll(&tracked(&[], &[])).await.expect("poll");
        assert_eq!(
            r.containers.len(),
            130,
            "all Queued with priority > 0 fit one page"
        );
        assert_eq!(r.containers[0].uuid, uuid(129), "highest priority first");
        assert!(r.containers.iter().all(|c| {
            c.mounts
                .as_ref()
                .is_some_and(|m| m["/tmp"].capacity == 1000)
        }));
        assert!(
            r.containers[0].created_at.0 > 1_700_000_000_000,
            "created_at parsed"
        );

        let up = c.lock(&uuid(5)).await.expect("lock");
        assert_eq!(up.state, ContainerState::Locked);
        assert_eq!(
            up.locked_by_uuid.as_deref(),
            Some("zzzzz-gj3su-dispatchersimul0")
        );
        let e = c.lock(&uuid(5)).await.expect_err("second lock");
        assert_eq!(e.status(), Some(422));
        assert!(e.to_string().contains("cannot lock when Locked"), "{e}");
        c.lock(&uuid(6)).await.expect("lock");
        c.cancel(&uuid(6)).await.expect("cancel");
        c.cancel_unsatisfiable(&uuid(7), true, "no suitable instance type")
            .await
            .expect("cancel unsatisfiable");
        let v = c.get_container(&uuid(7), None).await.expect("get");
        assert_eq!(v["state"], "Cancelled");
        assert_eq!(v["runtime_status"]["error"], "no suitable instance type");

        // "mine" returns the locked one; the missing re-fetch (21 UUIDs: a long query sent as a
        // POST override) returns the cancelled ones and reports unknown UUIDs as deleted.
        let known: Vec<String> = (0..130).map(uuid).collect();
        let mut missing: Vec<String> = vec![uuid(6), uuid(7)];
        missing.extend((0..19).map(|i| format!("zzzzz-dz642-gone{i:011}")));
        let r = c.poll(&tracked(&known, &missing)).await.expect("poll");
        let find = |u: &str| r.containers.iter().find(|c| c.uuid == u).cloned();
        assert_eq!(find(&uuid(5)).expect("mine").state, ContainerState::Locked);
        assert_eq!(
            find(&uuid(6)).expect("refetched").state,
            ContainerState::Cancelled
        );
        assert_eq!(
            find(&uuid(7)).expect("refetched").state,
            ContainerState::Cancelled
        );
        assert_eq!(r.deleted.len(), 19);
        assert_eq!(r.containers.len(), 130 - 3 + 3);

        let up = c.unlock(&uuid(5)).await.expect("unlock");
        assert_eq!(up.state, ContainerState::Queued);
        assert_eq!(up.locked_by_uuid, None);
        let mut fields = arvados_dispatch_cloud::arvados::Fields::new();
        fields.insert("state".into(), json!("Running"));
        let e = c
            .update_container(&uuid(5), fields)
            .await
            .expect_err("Queued -> Running");
        assert_eq!(e.status(), Some(422));
    })
    .await
}
