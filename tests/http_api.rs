//! The management API over real HTTP on loopback: authentication, every route's JSON shape and
//! error bodies (reference-scheduler.md §6), admin effects visible in `/instances`, the install
//! guide's `curl` example and `promtool check metrics` on our `/metrics`.
#![cfg(feature = "runtime")]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arvados_dispatch_cloud::config;
use arvados_dispatch_cloud::core::types::ContainerState;
use arvados_dispatch_cloud::core::{Dispatcher, Timestamp};
use arvados_dispatch_cloud::http::{ApiState, NOT_CONFIGURED, router};
use serde_json::Value;

use common::world::{World, options};

/// Every test gives up after this long instead of hanging.
const DEADLINE: Duration = Duration::from_secs(120);

const GIB: i64 = 1 << 30;

fn fixture(name: &str) -> config::Loaded {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/config")
        .join(name);
    config::load_file(&path).expect("fixture config loads")
}

/// A dispatcher from the current-layout fixture, driven by the fake world until two containers
/// run (MaxInstances 2) and two more wait in the queue.
fn busy_dispatcher() -> (Dispatcher, Timestamp, config::Loaded) {
    let loaded = fixture("current-layout.yml");
    let mut cfg = loaded.core.clone();
    cfg.cloud_vms.max_instances = 2;
    let mut w = World::new(cfg.clone(), 7);
    w.run_time = Duration::from_secs(24 * 3600);
    for i in 1..=4 {
        w.add(common::container(i, ContainerState::Queued, 1, 2, GIB));
    }
    let running = |w: &World| {
        w.db.values()
            .filter(|c| c.state == ContainerState::Running)
            .count()
    };
    assert!(
        w.run(Duration::from_secs(3600), |w| running(w) == 2),
        "two containers should start within an hour of virtual time"
    );
    // Let the dispatcher run a few more passes so the waiting containers have statuses.
    w.advance(Duration::from_secs(30));
    let now = w.now;
    let d = std::mem::replace(&mut w.d, Dispatcher::new(cfg, options(1), now));
    (d, now, loaded)
}

/// A served router and a client for it.
struct Api {
    base: String,
    client: reqwest::Client,
    state: ApiState,
    clock: Arc<AtomicU64>,
}

fn install_crypto() {
    // Several tests may race to install it; only the first succeeds, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn serve(d: Dispatcher, now: Timestamp, token: &str) -> Api {
    install_crypto();
    let clock = Arc::new(AtomicU64::new(now.as_millis()));
    let c = clock.clone();
    let state = ApiState::new(
        Arc::new(Mutex::new(d)),
        Arc::new(tokio::sync::Notify::new()),
        token.to_string(),
        Arc::new(move || Timestamp(c.load(Ordering::SeqCst))),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let app = router(state.clone());
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    Api {
        base: format!("http://{addr}"),
        client,
        state,
        clock,
    }
}

impl Api {
    async fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("GET");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    }

    async fn post(&self, path: &str, token: &str, form: &[(&str, &str)]) -> (u16, String) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .query(form)
            .send()
            .await
            .expect("POST");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    }

    async fn json(&self, path: &str, token: &str) -> Value {
        let (status, body) = self.get(path, Some(token)).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: bad JSON {e}: {body}"))
    }

    async fn instances(&self, token: &str) -> Vec<Value> {
        let v = self.json("/arvados/v1/dispatch/instances", token).await;
        v["items"].as_array().cloned().unwrap_or_default()
    }
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        tokio::time::timeout(DEADLINE, f)
            .await
            .expect("test finished before its deadline");
    });
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
    k.sort();
    k
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut k: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    k.sort();
    k
}

fn is_rfc3339(s: &str) -> bool {
    // YYYY-MM-DDTHH:MM:SS[.fff]Z
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && s.ends_with('Z')
}

#[test]
fn authentication() {
    let (d, now, loaded) = busy_dispatcher();
    let token = loaded.secrets.management_token.clone();
    run(async move {
        let api = serve(d, now, &token).await;
        for path in [
            "/arvados/v1/dispatch/containers",
            "/arvados/v1/dispatch/instances",
            "/metrics",
            "/metrics.json",
            "/_health/ping",
            "/no/such/path",
        ] {
            let (status, body) = api.get(path, None).await;
            assert_eq!((status, body.as_str()), (401, "Unauthorized\n"), "{path}");
            let (status, body) = api.get(path, Some("wrong")).await;
            assert_eq!((status, body.as_str()), (403, "Forbidden\n"), "{path}");
        }
        // POST routes check the token before their parameters.
        let (status, _) = api
            .post("/arvados/v1/dispatch/instances/hold", "wrong", &[])
            .await;
        assert_eq!(status, 403);

        let url = |p: &str| format!("{}{p}", api.base);
        let path = "/arvados/v1/dispatch/instances";
        // OAuth2 header.
        let r = api
            .client
            .get(url(path))
            .header("Authorization", format!("OAuth2 {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        // Basic-auth password.
        let r = api
            .client
            .get(url(path))
            .basic_auth("anyone", Some(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        // api_token query parameter.
        let r = api
            .client
            .get(url(path))
            .query(&[("api_token", &token)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        // api_token form parameter.
        let r = api
            .client
            .post(url("/arvados/v1/dispatch/instances/hold"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(format!("api_token={token}"))
            .send()
            .await
            .unwrap();
        // Authenticated, then rejected for the missing instance_id.
        assert_eq!(r.status().as_u16(), 400);
        // arvados_api_token cookie, base64url without padding.
        let cookie = base64url(token.as_bytes());
        let r = api
            .client
            .get(url(path))
            .header("Cookie", format!("other=1; arvados_api_token={cookie}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        // A wrong cookie is a wrong token.
        let r = api
            .client
            .get(url(path))
            .header(
                "Cookie",
                format!("arvados_api_token={}", base64url(b"nope")),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403);

        // The health check wants the exact header; a query token passes the router's check but
        // not the health handler's.
        let r = api
            .client
            .get(url("/_health/ping"))
            .query(&[("api_token", &token)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        assert_eq!(r.text().await.unwrap(), "authorization required\n");
        let r = api
            .client
            .get(url("/_health/ping"))
            .query(&[("api_token", &token)])
            .header("Authorization", format!("OAuth2 {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403);
        let (status, body) = api.get("/_health/ping", Some(&token)).await;
        assert_eq!((status, body.as_str()), (200, "{\"health\":\"OK\"}\n"));
        let (status, _) = api.get("/_health/nonesuch", Some(&token)).await;
        assert_eq!(status, 404);
    });
}

fn base64url(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, x)| acc | (u32::from(*x) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn empty_management_token_disables_every_route() {
    let loaded = fixture("current-layout.yml");
    let d = Dispatcher::new(loaded.core.clone(), options(1), Timestamp(1_000_000));
    run(async move {
        let api = serve(d, Timestamp(1_000_000), "").await;
        let want = format!("{NOT_CONFIGURED}\n");
        for path in [
            "/arvados/v1/dispatch/containers",
            "/arvados/v1/dispatch/container?container_uuid=x",
            "/arvados/v1/dispatch/instances",
            "/metrics",
            "/metrics.json",
            "/_health/ping",
        ] {
            for token in [None, Some(""), Some("anything")] {
                let (status, body) = api.get(path, token).await;
                assert_eq!((status, body.as_str()), (403, want.as_str()), "{path}");
            }
        }
        for path in [
            "/arvados/v1/dispatch/containers/kill",
            "/arvados/v1/dispatch/instances/hold",
            "/arvados/v1/dispatch/instances/drain",
            "/arvados/v1/dispatch/instances/run",
            "/arvados/v1/dispatch/instances/kill",
        ] {
            let (status, body) = api.post(path, "anything", &[("instance_id", "i")]).await;
            assert_eq!((status, body.as_str()), (403, want.as_str()), "{path}");
        }
    });
}

#[test]
fn containers_are_null_before_the_first_pass() {
    let loaded = fixture("current-layout.yml");
    let token = loaded.secrets.management_token.clone();
    let d = Dispatcher::new(loaded.core.clone(), options(1), Timestamp(1_000_000));
    run(async move {
        let api = serve(d, Timestamp(1_000_000), &token).await;
        let (status, body) = api
            .get("/arvados/v1/dispatch/containers", Some(&token))
            .await;
        assert_eq!((status, body.as_str()), (200, "{\"items\":null}\n"));
        let (status, body) = api
            .get("/arvados/v1/dispatch/instances", Some(&token))
            .await;
        assert_eq!((status, body.as_str()), (200, "{\"items\":null}\n"));
        let (status, body) = api
            .get(
                "/arvados/v1/dispatch/container?container_uuid=zzzzz-dz642-000000000000001",
                Some(&token),
            )
            .await;
        assert_eq!(
            (status, body.as_str()),
            (404, "{\"errors\":[\"container not found\"]}\n")
        );
    });
}

#[test]
fn queue_and_instance_shapes() {
    let (d, now, loaded) = busy_dispatcher();
    let token = loaded.secrets.management_token.clone();
    run(async move {
        let api = serve(d, now, &token).await;
        let q = api.json("/arvados/v1/dispatch/containers", &token).await;
        let items = q["items"].as_array().expect("items after the first pass");
        assert_eq!(items.len(), 4, "{q}");
        let mut statuses = Vec::new();
        for it in items {
            assert_eq!(
                keys(it),
                sorted(&[
                    "container",
                    "instance_resources",
                    "instance_types",
                    "first_seen_at",
                    "scheduling_status"
                ])
            );
            let c = &it["container"];
            assert!(c["uuid"].as_str().unwrap().starts_with("zzzzz-dz642-"));
            assert!(c["mounts"].is_null());
            assert!(is_rfc3339(c["created_at"].as_str().unwrap()), "{c}");
            assert_eq!(c["modified_at"], "0001-01-01T00:00:00Z");
            assert_eq!(c["runtime_constraints"]["vcpus"], 2);
            assert_eq!(c["runtime_constraints"]["ram"], GIB);
            assert!(
                ["Queued", "Locked", "Running"].contains(&c["state"].as_str().unwrap()),
                "{c}"
            );
            assert_eq!(
                keys(&it["instance_resources"]),
                sorted(&["VCPUs", "RAM", "Scratch", "GPUs", "GPUVRAM"])
            );
            assert_eq!(it["instance_resources"]["VCPUs"], 2);
            let types = it["instance_types"].as_array().expect("eligible types");
            assert!(!types.is_empty());
            for t in types {
                assert_eq!(
                    keys(t),
                    sorted(&[
                        "ProviderType",
                        "VCPUs",
                        "RAM",
                        "IncludedScratch",
                        "AddedScratch",
                        "Price",
                        "Preemptible",
                        "GPU"
                    ])
                );
                assert_eq!(
                    keys(&t["GPU"]),
                    sorted(&[
                        "Stack",
                        "DriverVersion",
                        "HardwareTarget",
                        "DeviceCount",
                        "VRAM"
                    ])
                );
            }
            assert_eq!(types[0]["ProviderType"], "m5.large");
            assert!(is_rfc3339(it["first_seen_at"].as_str().unwrap()));
            statuses.push(it["scheduling_status"].as_str().unwrap().to_string());
        }
        // Two run, two wait for an instance (MaxInstances 2).
        assert!(
            statuses.iter().filter(|s| s.is_empty()).count() >= 1,
            "{statuses:?}"
        );
        assert!(
            statuses.iter().any(|s| s.starts_with("Waiting")),
            "{statuses:?}"
        );

        // One container by UUID: the same object as in the list.
        let uuid = items[0]["container"]["uuid"].as_str().unwrap().to_string();
        let one = api
            .json(
                &format!("/arvados/v1/dispatch/container?container_uuid={uuid}"),
                &token,
            )
            .await;
        assert_eq!(one, items[0]);
        let (status, body) = api
            .get("/arvados/v1/dispatch/container", Some(&token))
            .await;
        assert_eq!(
            (status, body.as_str()),
            (404, "{\"errors\":[\"container not found\"]}\n")
        );

        let inst = api.instances(&token).await;
        assert_eq!(inst.len(), 2, "{inst:?}");
        let mut ids = Vec::new();
        for i in &inst {
            assert_eq!(
                keys(i),
                sorted(&[
                    "instance",
                    "address",
                    "price",
                    "arvados_instance_type",
                    "provider_instance_type",
                    "last_container_uuid",
                    "last_busy",
                    "running_container_uuids",
                    "worker_state",
                    "idle_behavior"
                ])
            );
            assert_eq!(i["arvados_instance_type"], "m5large");
            assert_eq!(i["provider_instance_type"], "m5.large");
            assert_eq!(i["price"], 0.096);
            assert_eq!(i["worker_state"], "running");
            assert_eq!(i["idle_behavior"], "run");
            assert!(is_rfc3339(i["last_busy"].as_str().unwrap()));
            let r = i["running_container_uuids"].as_array().unwrap();
            assert_eq!(r.len(), 1);
            assert_eq!(i["last_container_uuid"], r[0]);
            ids.push(i["instance"].as_str().unwrap().to_string());
        }
        let mut s = ids.clone();
        s.sort();
        assert_eq!(ids, s, "instances are sorted by ID");
    });
}

#[test]
fn admin_actions_and_their_errors() {
    let (d, now, loaded) = busy_dispatcher();
    let token = loaded.secrets.management_token.clone();
    run(async move {
        let api = serve(d, now, &token).await;
        let inst = api.instances(&token).await;
        let id0 = inst[0]["instance"].as_str().unwrap().to_string();
        let id1 = inst[1]["instance"].as_str().unwrap().to_string();
        let running = inst[0]["running_container_uuids"][0]
            .as_str()
            .unwrap()
            .to_string();

        // Missing and unknown IDs.
        for action in ["hold", "drain", "run", "kill"] {
            let path = format!("/arvados/v1/dispatch/instances/{action}");
            let (status, body) = api.post(&path, &token, &[]).await;
            assert_eq!(
                (status, body.as_str()),
                (
                    400,
                    "{\"errors\":[\"instance_id parameter not provided\"]}\n"
                ),
                "{action}"
            );
            let (status, body) = api.post(&path, &token, &[("instance_id", "")]).await;
            assert_eq!(status, 400, "{action}: {body}");
            let (status, body) = api
                .post(&path, &token, &[("instance_id", "i-nonesuch")])
                .await;
            let want = if action == "kill" {
                "{\"errors\":[\"instance not found\"]}\n"
            } else {
                "{\"errors\":[\"requested instance does not exist\"]}\n"
            };
            assert_eq!((status, body.as_str()), (404, want), "{action}");
        }
        let (status, body) = api
            .post("/arvados/v1/dispatch/containers/kill", &token, &[])
            .await;
        assert_eq!(
            (status, body.as_str()),
            (
                400,
                "{\"errors\":[\"container_uuid parameter not provided\"]}\n"
            )
        );
        let (status, body) = api
            .post(
                "/arvados/v1/dispatch/containers/kill",
                &token,
                &[("container_uuid", "zzzzz-dz642-999999999999999")],
            )
            .await;
        assert_eq!(
            (status, body.as_str()),
            (404, "{\"errors\":[\"container not found\"]}\n")
        );
        // GET on a POST route is not allowed.
        let (status, _) = api
            .get("/arvados/v1/dispatch/instances/hold", Some(&token))
            .await;
        assert_eq!(status, 405);

        let behavior = |inst: &[Value], id: &str| -> (String, String) {
            let i = inst
                .iter()
                .find(|i| i["instance"] == id)
                .unwrap_or_else(|| panic!("{id} listed"));
            (
                i["idle_behavior"].as_str().unwrap().to_string(),
                i["worker_state"].as_str().unwrap().to_string(),
            )
        };
        api.clock.fetch_add(1000, Ordering::SeqCst);
        for (action, want) in [("hold", "hold"), ("drain", "drain"), ("run", "run")] {
            let (status, body) = api
                .post(
                    &format!("/arvados/v1/dispatch/instances/{action}"),
                    &token,
                    &[("instance_id", &id0)],
                )
                .await;
            assert_eq!((status, body.as_str()), (200, ""), "{action}");
            let inst = api.instances(&token).await;
            assert_eq!(behavior(&inst, &id0).0, want, "{action}");
        }
        // Parameters in a form body work as well as in the query.
        let r = api
            .client
            .post(format!("{}/arvados/v1/dispatch/instances/hold", api.base))
            .bearer_auth(&token)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(format!("instance_id={id1}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(behavior(&api.instances(&token).await, &id1).0, "hold");

        // Kill a container: the runner starts its kill loop; the list still shows it.
        let (status, body) = api
            .post(
                "/arvados/v1/dispatch/containers/kill",
                &token,
                &[("container_uuid", &running), ("reason", "test")],
            )
            .await;
        assert_eq!((status, body.as_str()), (200, ""));
        // The admin call produced commands for the shell to run.
        {
            let mut d = api.state.dispatcher.lock().unwrap();
            let mut kinds = Vec::new();
            while let Some(c) = d.poll_command() {
                kinds.push(format!("{:?}", c.kind));
            }
            assert!(
                kinds.iter().any(|k| k.contains(&running)),
                "a kill command for {running}: {kinds:?}"
            );
        }

        // Kill an instance: it goes to shutdown at once.
        let (status, body) = api
            .post(
                "/arvados/v1/dispatch/instances/kill",
                &token,
                &[("instance_id", &id1), ("reason", "because")],
            )
            .await;
        assert_eq!((status, body.as_str()), (200, ""));
        assert_eq!(
            behavior(&api.instances(&token).await, &id1).1,
            "shutdown",
            "killed instance state"
        );

        // A clock behind the core's time is clamped, not a panic.
        api.clock.store(0, Ordering::SeqCst);
        let (status, _) = api
            .post(
                "/arvados/v1/dispatch/instances/run",
                &token,
                &[("instance_id", &id0)],
            )
            .await;
        assert_eq!(status, 200);
    });
}

#[test]
fn poisoned_dispatcher_is_a_500_not_a_panic() {
    let loaded = fixture("current-layout.yml");
    let token = loaded.secrets.management_token.clone();
    let d = Dispatcher::new(loaded.core.clone(), options(1), Timestamp(1_000_000));
    run(async move {
        let api = serve(d, Timestamp(1_000_000), &token).await;
        let m = api.state.dispatcher.clone();
        let _ = std::thread::spawn(move || {
            let _g = m.lock().unwrap();
            panic!("poisoning the dispatcher mutex on purpose");
        })
        .join();
        for path in ["/arvados/v1/dispatch/instances", "/metrics"] {
            let (status, body) = api.get(path, Some(&token)).await;
            assert_eq!(status, 500, "{path}");
            assert!(body.contains("panicked"), "{body}");
        }
        let (status, _) = api
            .post(
                "/arvados/v1/dispatch/instances/hold",
                &token,
                &[("instance_id", "x")],
            )
            .await;
        assert_eq!(status, 500);
    });
}

/// Every metric family reference-scheduler.md §6 and reference-workers.md §8 name, with its
/// type (EC2's own metrics belong to the driver).
const FAMILIES: &[(&str, &str)] = &[
    ("at_quota", "gauge"),
    ("boot_outcomes", "counter"),
    ("containers_allocated_not_started", "gauge"),
    ("containers_longest_wait_time_seconds", "gauge"),
    ("containers_not_allocated_over_quota", "gauge"),
    ("containers_running", "gauge"),
    (
        "containers_time_from_queue_to_crunch_run_seconds",
        "summary",
    ),
    ("driver_operations", "counter"),
    ("instances_disappeared", "counter"),
    ("instances_price", "gauge"),
    ("instances_run_probe_duration_seconds", "summary"),
    (
        "instances_time_from_shutdown_request_to_disappearance_seconds",
        "summary",
    ),
    ("instances_time_to_ready_for_container_seconds", "summary"),
    ("instances_time_to_ssh_seconds", "summary"),
    ("instances_total", "gauge"),
    ("last_503_time", "gauge"),
    ("max_concurrent_containers", "gauge"),
    ("memory_bytes_total", "gauge"),
    ("probe_age_seconds_max", "gauge"),
    ("probe_age_seconds_median", "gauge"),
    ("queue_entries", "gauge"),
    ("vcpus_total", "gauge"),
];

#[test]
fn metrics_text_and_json() {
    let (d, now, loaded) = busy_dispatcher();
    let token = loaded.secrets.management_token.clone();
    run(async move {
        let api = serve(d, now, &token).await;
        let r = api
            .client
            .get(format!("{}/metrics", api.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(
            r.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = r.text().await.unwrap();
        let types: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (n, t) = l.split_once(' ').unwrap();
                (n.to_string(), t.to_string())
            })
            .collect();
        let want: Vec<(String, String)> = FAMILIES
            .iter()
            .map(|(n, t)| (format!("arvados_dispatchcloud_{n}"), t.to_string()))
            .collect();
        assert_eq!(types, want, "every family, sorted by name, with its type");
        assert!(!text.contains("_total{") || !text.contains("boot_outcomes_total"));
        let has = |line: &str| text.lines().any(|l| l == line);
        // Counters keep Go's names (no _total) and every series is pre-created.
        for op in ["Create", "List", "Destroy", "SetTags"] {
            for e in ["0", "1"] {
                let prefix = format!(
                    "arvados_dispatchcloud_driver_operations{{operation=\"{op}\",error=\"{e}\"}} "
                );
                assert!(
                    text.lines().any(|l| l.starts_with(&prefix)),
                    "missing {prefix}"
                );
            }
        }
        assert!(has(
            "arvados_dispatchcloud_driver_operations{operation=\"Destroy\",error=\"1\"} 0"
        ));
        for o in ["success", "failure", "aborted", "disappeared"] {
            assert!(
                text.contains(&format!(
                    "arvados_dispatchcloud_boot_outcomes{{outcome=\"{o}\"}} "
                )),
                "{o}"
            );
        }
        assert!(has(
            "arvados_dispatchcloud_boot_outcomes{outcome=\"success\"} 2"
        ));
        for s in ["unknown", "booting", "idle", "running", "shutdown"] {
            assert!(has(&format!(
                "arvados_dispatchcloud_instances_disappeared{{state=\"{s}\"}} 0"
            )));
        }
        // Two running containers on two in-use m5large workers; the other types and categories
        // are zero.
        assert!(has("arvados_dispatchcloud_containers_running 2"));
        assert!(has(
            "arvados_dispatchcloud_instances_total{category=\"inuse\",instance_type=\"m5large\"} 2"
        ));
        assert!(has(
            "arvados_dispatchcloud_instances_total{category=\"idle\",instance_type=\"p5_48xlarge\"} 0"
        ));
        assert!(has(
            "arvados_dispatchcloud_instances_price{category=\"inuse\"} 0.192"
        ));
        assert!(has(
            "arvados_dispatchcloud_vcpus_total{category=\"inuse\"} 4"
        ));
        assert!(has(
            "arvados_dispatchcloud_memory_bytes_total{category=\"inuse\"} 1.7179869184e+10"
        ));
        assert!(has(
            "arvados_dispatchcloud_vcpus_total{category=\"hold\"} 0"
        ));
        assert!(has(
            "arvados_dispatchcloud_queue_entries{state=\"Running\",instance_type=\"m5large\"} 2"
        ));
        // Two instances with MaxInstances 2: the pool is at quota.
        assert!(has("arvados_dispatchcloud_at_quota 1"));
        let max = api
            .state
            .dispatcher
            .lock()
            .unwrap()
            .sched_metrics()
            .max_concurrent_containers;
        assert!(has(&format!(
            "arvados_dispatchcloud_max_concurrent_containers {max}"
        )));
        // Summaries: four quantiles, _sum and _count.
        for q in ["0.5", "0.9", "0.95", "0.99"] {
            assert!(text.contains(&format!(
                "arvados_dispatchcloud_containers_time_from_queue_to_crunch_run_seconds{{quantile=\"{q}\"}} "
            )));
            assert!(text.contains(&format!(
                "arvados_dispatchcloud_instances_run_probe_duration_seconds{{outcome=\"success\",quantile=\"{q}\"}} "
            )));
        }
        assert!(has(
            "arvados_dispatchcloud_containers_time_from_queue_to_crunch_run_seconds_count 2"
        ));

        // The JSON export holds the same families.
        let j = api.json("/metrics.json", &token).await;
        let fams = j.as_array().expect("an array of families");
        let names: Vec<String> = fams
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect();
        let want_names: Vec<String> = want.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, want_names);
        let running = fams
            .iter()
            .find(|f| f["name"] == "arvados_dispatchcloud_containers_running")
            .unwrap();
        assert_eq!(running["type"], 1);
        assert_eq!(running["metric"][0]["gauge"]["value"], 2.0);
        let ssh = fams
            .iter()
            .find(|f| {
                f["name"]
                    == "arvados_dispatchcloud_containers_time_from_queue_to_crunch_run_seconds"
            })
            .unwrap();
        assert_eq!(ssh["type"], 2);
        assert_eq!(ssh["metric"][0]["summary"]["sample_count"], 2);
        assert_eq!(
            ssh["metric"][0]["summary"]["quantile"]
                .as_array()
                .unwrap()
                .len(),
            4
        );

        promtool_check(&text).await;
    });
}

/// `promtool check metrics` must find no error in our output. Its lint warnings about Go's own
/// naming (counters without `_total`, gauges named `*_total`) are parity, not errors.
async fn promtool_check(text: &str) {
    use tokio::io::AsyncWriteExt;
    let child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool (Debian package prometheus) is needed for this test and could not be \
             started ({e}); run scripts/test, which installs it"
        ),
    };
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("promtool runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("promtool check metrics: {:?}\n{report}", out.status);
    let allowed = [
        "counter metrics should have \"_total\" suffix",
        "non-counter metrics should not have \"_total\" suffix",
    ];
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            allowed.iter().any(|a| line.contains(a)),
            "promtool reported a problem: {line}\nfull report:\n{report}"
        );
    }
    // Exit status 0 (clean) or 3 (lint findings only); anything else is an error.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "promtool failed with {:?}: {report}",
        out.status
    );
}

#[test]
fn install_guide_curl_example() {
    // The install guide: token="xyzzy"; curl -H "Authorization: Bearer $token"
    // http://localhost:9006/metrics. Port 9006 may be taken here, so the port is ours.
    let loaded = fixture("install-guide-ec2.yml");
    let token = loaded.secrets.management_token.clone();
    assert_eq!(token, "xyzzy");
    let d = Dispatcher::new(loaded.core.clone(), options(1), Timestamp(1_000_000));
    run(async move {
        let api = serve(d, Timestamp(1_000_000), &token).await;
        let port = api.base.rsplit(':').next().unwrap().to_string();
        let out = tokio::process::Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "30",
                "-H",
                &format!("Authorization: Bearer {token}"),
                &format!("http://127.0.0.1:{port}/metrics"),
            ])
            .output()
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                eprintln!("curl is not installed ({e}); the curl example is not checked");
                return;
            }
        };
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body = String::from_utf8(out.stdout).unwrap();
        let want = "# HELP arvados_dispatchcloud_containers_running Number of containers reported running by cloud VMs.\n\
                    # TYPE arvados_dispatchcloud_containers_running gauge\n\
                    arvados_dispatchcloud_containers_running 0\n";
        assert!(body.contains(want), "{body}");
    });
}

#[test]
fn container_list_is_cached_for_a_second() {
    let (d, now, loaded) = busy_dispatcher();
    let token = loaded.secrets.management_token.clone();
    let core = loaded.core.clone();
    run(async move {
        let api = serve(d, now, &token).await;
        let count = |v: Value| v["items"].as_array().map(Vec::len);
        let path = "/arvados/v1/dispatch/containers";
        assert_eq!(count(api.json(path, &token).await), Some(4));
        // Swap in a dispatcher whose first pass saw an empty queue.
        {
            let mut fresh = Dispatcher::new(core, options(1), now);
            fresh.run_pass(now);
            *api.state.dispatcher.lock().unwrap() = fresh;
        }
        api.clock.fetch_add(999, Ordering::SeqCst);
        assert_eq!(count(api.json(path, &token).await), Some(4), "cached");
        // The single-container route reads the live queue.
        let (status, _) = api
            .get(
                "/arvados/v1/dispatch/container?container_uuid=zzzzz-dz642-000000000000001",
                Some(&token),
            )
            .await;
        assert_eq!(status, 404);
        api.clock.fetch_add(1, Ordering::SeqCst);
        assert_eq!(count(api.json(path, &token).await), Some(0), "refreshed");
        // Unknown paths answer 404 once authenticated.
        let (status, body) = api.get("/no/such/path", Some(&token)).await;
        assert_eq!((status, body.as_str()), (404, "404 page not found\n"));
    });
}

#[test]
fn health_reports_a_runner_that_cannot_load() {
    use arvados_dispatch_cloud::core::pool::remote::RunnerSpec;
    let loaded = fixture("current-layout.yml");
    let token = loaded.secrets.management_token.clone();
    let mut opts = options(1);
    opts.runner = RunnerSpec {
        load_error: Some("open /usr/bin/crunch-run: no such file or directory".into()),
        ..RunnerSpec::installed("crunch-run")
    };
    let d = Dispatcher::new(loaded.core.clone(), opts, Timestamp(1_000_000));
    run(async move {
        let api = serve(d, Timestamp(1_000_000), &token).await;
        let (status, body) = api.get("/_health/ping", Some(&token)).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            "{\"error\":\"open /usr/bin/crunch-run: no such file or directory\",\"health\":\"ERROR\"}\n"
        );
    });
}
