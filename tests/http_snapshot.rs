//! `GET /arvados/v1/dispatch/snapshot` over real HTTP on loopback: the management token is
//! checked as on every route, the body is a snapshot (docs/pricing.md, "What-if") with the
//! queue, the instances, the effective config and the arrival statistics, and no secret of the
//! cluster config or of the instances reaches it.
#![cfg(feature = "runtime")]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arvados_dispatch_cloud::config;
use arvados_dispatch_cloud::core::snapshot::{FORMAT, Snapshot, VERSION};
use arvados_dispatch_cloud::core::types::ContainerState;
use arvados_dispatch_cloud::core::{Dispatcher, Timestamp};
use arvados_dispatch_cloud::http::{ApiState, router};
use serde_json::Value;

use common::world::{World, options};

const DEADLINE: Duration = Duration::from_secs(120);
const GIB: i64 = 1 << 30;
const PATH: &str = "/arvados/v1/dispatch/snapshot";

fn fixture() -> config::Loaded {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/config/current-layout.yml");
    config::load_file(&path).expect("fixture config loads")
}

/// A dispatcher on the fake world: six 1-VCPU containers arrive after its first poll, at most
/// two instances of two VCPUs run them ten minutes each, so four have completed and two run
/// when the snapshot is taken. Returns the dispatcher, the time, the config and the instances'
/// tag values (which include their secrets).
fn dispatcher() -> (Dispatcher, Timestamp, config::Loaded, Vec<String>) {
    let loaded = fixture();
    let mut cfg = loaded.core.clone();
    cfg.cloud_vms.max_instances = 2;
    cfg.cloud_vms.max_running_containers_per_instance = 2;
    let mut w = World::new(cfg.clone(), 11);
    w.run_time = Duration::from_secs(600);
    w.advance(Duration::from_secs(30));
    for i in 1..=6 {
        w.add(common::container(
            i,
            ContainerState::Queued,
            10 + i as i64,
            1,
            GIB,
        ));
    }
    let count = |w: &World, s: ContainerState| w.db.values().filter(|c| c.state == s).count();
    assert!(
        w.run(Duration::from_secs(3 * 3600), |w| count(
            w,
            ContainerState::Complete
        ) >= 4
            && count(w, ContainerState::Running) >= 1),
        "four containers should complete and another run within three hours of virtual time"
    );
    w.advance(Duration::from_secs(20));
    let tags: Vec<String> = w
        .vms
        .values()
        .flat_map(|v| v.info.tags.values().cloned())
        .collect();
    let now = w.now;
    let d = std::mem::replace(&mut w.d, Dispatcher::new(cfg, options(1), now));
    (d, now, loaded, tags)
}

async fn get(base: &str, token: Option<&str>) -> (u16, String) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut req = client.get(format!("{base}{PATH}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("GET");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

#[test]
fn snapshot_route() {
    let (d, now, loaded, instance_tags) = dispatcher();
    let token = loaded.secrets.management_token.clone();
    let expected_config = d.config().clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (unauthorized, forbidden, (status, body)) = rt.block_on(async move {
        tokio::time::timeout(DEADLINE, async move {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let state = ApiState::new(
                Arc::new(Mutex::new(d)),
                Arc::new(tokio::sync::Notify::new()),
                token.clone(),
                Arc::new(move || now),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind loopback");
            let base = format!("http://{}", listener.local_addr().expect("addr"));
            tokio::spawn(async move {
                axum::serve(listener, router(state)).await.expect("serve");
            });
            (
                get(&base, None).await,
                get(&base, Some("wrong")).await,
                get(&base, Some(&token)).await,
            )
        })
        .await
        .expect("test finished before its deadline")
    });
    assert_eq!(unauthorized, (401, "Unauthorized\n".to_string()));
    assert_eq!(forbidden, (403, "Forbidden\n".to_string()));
    assert_eq!(status, 200, "{body}");

    // No secret: not the config's tokens, key, cloud or database credentials, nor the
    // instances' secrets (their tags are left out entirely).
    let s = &loaded.secrets;
    let mut secrets = vec![
        s.system_root_token.clone(),
        s.management_token.clone(),
        "tEsTkEyNoTrEaLbUtReCoGnIsAbLe0123456789".to_string(),
        "AKIAtEsTaCcEsSkEyId0".to_string(),
        "sEcReTaCcEsSkEyThAtMuStNeVeRbEpRiNtEd0123".to_string(),
        "pG-pAsSwOrD-nEvEr-pRiNtEd".to_string(),
        "bLoBsIgNiNgKeYbLoBsIgNiNgKeY0123456789".to_string(),
    ];
    assert!(!instance_tags.is_empty());
    secrets.extend(instance_tags.into_iter().filter(|t| t.len() >= 20));
    for secret in &secrets {
        assert!(!secret.is_empty());
        assert!(
            !body.contains(secret.as_str()),
            "a secret is in the snapshot"
        );
    }
    // Of DriverParameters, only the EC2 quota groups (no credential) are there.
    let v: Value = serde_json::from_str(&body).expect("JSON");
    let params = &v["config"]["Clusters"]["zzzzz"]["Containers"]["CloudVMs"]["DriverParameters"];
    let names: Vec<&String> = params.as_object().expect("a mapping").keys().collect();
    assert_eq!(names, ["InstanceTypeQuotaGroups"], "{params}");
    assert!(!body.contains("\"tags\""), "{body}");

    for key in [
        "format",
        "version",
        "taken_at_ms",
        "cluster_id",
        "config",
        "containers",
        "instances",
        "pending_creates",
        "arrivals",
    ] {
        assert!(v.get(key).is_some(), "no {key} in {body}");
    }
    let snap: Snapshot = serde_json::from_value(v).expect("a snapshot");
    assert_eq!((snap.format.as_str(), snap.version), (FORMAT, VERSION));
    assert_eq!(snap.taken_at_ms, now.as_millis());
    assert_eq!(snap.cluster_id, "zzzzz");
    // The queue: the two containers still running (completed ones are forgotten).
    let running: Vec<_> = snap
        .containers
        .iter()
        .filter(|c| c.state == ContainerState::Running)
        .collect();
    assert!(!running.is_empty(), "{body}");
    for c in &running {
        let inst = c
            .instance
            .as_deref()
            .expect("a running container's instance");
        assert!(
            snap.instances
                .iter()
                .any(|i| i.id == inst && i.containers.contains(&c.uuid)),
            "{body}"
        );
        assert_eq!(c.instance_type, "m5large");
        assert!(c.running_since_ms.is_some(), "{body}");
    }
    assert!(!snap.instances.is_empty());
    for i in &snap.instances {
        assert_eq!((i.instance_type.as_str(), i.price), ("m5large", 0.096));
    }
    // Arrivals: all six arrived after the first poll; four completed after about ten minutes.
    let a = &snap.arrivals;
    assert_eq!(a.total, 6, "{body}");
    assert_eq!(a.by_instance_type["m5large"].count, 6);
    assert!(a.observed_seconds > 0.0 && a.per_hour > 0.0);
    assert!(a.runtimes_observed >= 4, "{body}");
    for c in &a.classes {
        for r in &c.runtime_seconds {
            assert!((590.0..=680.0).contains(r), "run time {r} in {body}");
        }
    }
    // The config loads back (with the dispatcher's own loader) into the config it runs on.
    let text = snap.config.to_string();
    let again = config::load_str(&text, "snapshot").expect("the snapshot's config loads");
    assert_eq!(again.core.instance_types, expected_config.instance_types);
    assert_eq!(again.core.containers, expected_config.containers);
    assert_eq!(again.core.cloud_vms, expected_config.cloud_vms);
}
