//! The EC2 driver against a scripted EC2 Query endpoint on 127.0.0.1 that replies with the
//! recorded responses in `fixtures/ec2/`: one row per error code of the reference tables
//! (reference-workers.md §6.2) with the kind the core receives, the throttling backoff, the
//! subnet failover order, paging, the shape of a RunInstances request, the spot price history
//! (DescribeInstanceStatus and DescribeSpotPriceHistory: normalised, per zone, refreshed only
//! after SpotPriceUpdateInterval, off at 0) and key pair import.
#![cfg(feature = "ec2")]

#[path = "support/ec2_fixture.rs"]
mod ec2_fixture;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arvados_dispatch_cloud::cloud::ec2::Ec2;
use arvados_dispatch_cloud::cloud::{
    CapacityScope, CloudError, CloudErrorKind, CreateRequest, InstanceInfo, InstanceSet,
};
use arvados_dispatch_cloud::core::price::probe_prices;
use arvados_dispatch_cloud::core::time::Timestamp;
use arvados_dispatch_cloud::core::types::{InstanceType, PricePoint};
use arvados_dispatch_cloud::http::metrics::{PREFIX, SampleValue, encode_text};
use ec2_fixture::{Call, FixtureServer};
use russh::keys::PublicKey;

/// The fixed "now" of the driver's clock, in milliseconds.
const T0: u64 = 1_800_000_000_000;
/// A generous bound on each driver call, so a hung call fails the test.
const DEADLINE: Duration = Duration::from_secs(60);
/// The secret access key given to the driver; it must never appear in an error.
const SECRET: &str = "fixtureSeCrEtKey0123456789";

impl FixtureServer {
    /// A driver pointed at this server with `extra` DriverParameters and a fixed clock.
    fn driver(&self, extra: serde_json::Value) -> Ec2 {
        driver_at(&self.url(), extra)
    }
}

fn driver_at(endpoint: &str, extra: serde_json::Value) -> Ec2 {
    driver_with_clock(endpoint, extra, Arc::new(AtomicU64::new(T0)))
}

/// A driver whose clock reads `now` (milliseconds).
fn driver_with_clock(endpoint: &str, extra: serde_json::Value, now: Arc<AtomicU64>) -> Ec2 {
    let mut params = serde_json::json!({
        "Region": "us-east-1",
        "AccessKeyID": "AKIDFIXTURE",
        "SecretAccessKey": SECRET,
        "Endpoint": endpoint,
        "AdminUsername": "crunch",
    });
    if let (Some(p), serde_json::Value::Object(e)) = (params.as_object_mut(), extra) {
        p.extend(e);
    }
    Ec2::from_driver_parameters(&params)
        .expect("driver parameters")
        .with_clock(Arc::new(move || Timestamp(now.load(Ordering::SeqCst))))
}

fn request(provider_type: &str) -> CreateRequest {
    let t = InstanceType {
        name: "m5large".into(),
        provider_type: provider_type.into(),
        vcpus: 2,
        ram: 8 << 30,
        price: 0.1,
        ..Default::default()
    };
    CreateRequest {
        instance_type: Arc::new(t),
        image_id: "ami-0123".into(),
        tags: [
            ("ArvadosInstanceSetID", "zzzzz-gj3su-000000000000000"),
            ("ArvadosInstanceType", "m5large"),
            ("ArvadosIdleBehavior", "run"),
            (
                "ArvadosInstanceSecret",
                "0123456789abcdef0123456789abcdef01234567",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        init_command: "echo hello".into(),
        public_key: None,
    }
}

async fn create(d: &Ec2, req: CreateRequest) -> Result<InstanceInfo, CloudError> {
    tokio::time::timeout(DEADLINE, d.create(req))
        .await
        .expect("create finished before the deadline")
}

async fn list(d: &Ec2, filter: &BTreeMap<String, String>) -> Result<Vec<InstanceInfo>, CloudError> {
    tokio::time::timeout(DEADLINE, d.list(filter))
        .await
        .expect("list finished before the deadline")
}

fn rate_limited(after_ms: u64) -> CloudErrorKind {
    CloudErrorKind::RateLimited {
        retry_at: Timestamp(T0 + after_ms),
    }
}

/// The samples of the driver's family `name` (without the prefix): label values and value.
fn series(d: &Ec2, name: &str) -> Option<Vec<(Vec<String>, f64)>> {
    let full = format!("{PREFIX}{name}");
    d.metric_families()
        .into_iter()
        .find(|f| f.name == full)
        .map(|f| {
            f.samples
                .into_iter()
                .map(|s| {
                    let v = match s.value {
                        SampleValue::Scalar(v) => v,
                        other => panic!("{name} has a non-scalar sample {other:?}"),
                    };
                    (s.labels.into_iter().map(|(_, v)| v).collect(), v)
                })
                .collect()
        })
}

/// `ec2_instance_starts_total` as (subnet_id, success, count), in export order.
fn starts(d: &Ec2) -> Vec<(String, String, f64)> {
    series(d, "ec2_instance_starts_total")
        .expect("ec2_instance_starts_total is always exported")
        .into_iter()
        .map(|(l, v)| {
            assert_eq!(l.len(), 2, "labels subnet_id and success");
            (l[0].clone(), l[1].clone(), v)
        })
        .collect()
}

/// Expected `starts` rows from (subnet, success, count).
fn want_starts(rows: &[(&str, &str, u32)]) -> Vec<(String, String, f64)> {
    rows.iter()
        .map(|(s, ok, n)| (s.to_string(), ok.to_string(), f64::from(*n)))
        .collect()
}

/// `ec2_instances` as (subnet_id, count), or None before the first listing.
fn instances_gauge(d: &Ec2) -> Option<Vec<(String, f64)>> {
    series(d, "ec2_instances").map(|rows| {
        rows.into_iter()
            .map(|(l, v)| {
                assert_eq!(l.len(), 1, "label subnet_id");
                (l[0].clone(), v)
            })
            .collect()
    })
}

#[tokio::test]
async fn each_error_code_reaches_the_core_as_its_kind() {
    use CloudErrorKind::*;
    let table: &[(&str, u16, CloudErrorKind)] = &[
        // Throttling (the SDK's default throttle codes): rate limited, first delay 1 s.
        ("RequestLimitExceeded", 503, rate_limited(1000)),
        ("Throttling", 400, rate_limited(1000)),
        // Quota.
        ("InstanceLimitExceeded", 400, Quota),
        ("InsufficientAddressCapacity", 400, Quota),
        ("InsufficientFreeAddressesInSubnet", 400, Quota),
        ("InsufficientVolumeCapacity", 400, Quota),
        ("MaxSpotInstanceCountExceeded", 400, Quota),
        // Capacity, with its scope.
        (
            "InsufficientInstanceCapacity",
            500,
            Capacity(CapacityScope::InstanceType),
        ),
        (
            "Unsupported-type",
            400,
            Capacity(CapacityScope::InstanceType),
        ),
        (
            "VcpuLimitExceeded",
            400,
            Capacity(CapacityScope::QuotaGroup),
        ),
        // Everything else.
        ("Unsupported-other", 400, Permanent),
        ("InvalidSubnetID.NotFound", 400, Permanent),
        ("InvalidParameterValue-subnet", 400, Permanent),
        ("InvalidParameterValue-other", 400, Permanent),
        ("InvalidAMIID.NotFound", 400, Permanent),
        ("AuthFailure", 401, Permanent),
        ("InternalError", 500, Transient),
        ("Unavailable", 503, Transient),
    ];
    for (name, status, want) in table {
        let file = format!("error-{name}.xml");
        let status = *status;
        let server = FixtureServer::start(move |_| (status, file.clone())).await;
        let d = server.driver(serde_json::json!({"SubnetID": "subnet-a"}));
        let err = create(&d, request("m5.large"))
            .await
            .expect_err("the fixture is an error");
        assert_eq!(err.kind, *want, "{name}: {err}");
        let code = name.split('-').next().expect("code");
        assert!(err.message.contains(code), "{name}: {err}");
        assert!(!err.message.contains(SECRET), "{name}: {err}");
        assert_eq!(server.run_subnets(), ["subnet-a"], "{name}");
    }
}

#[tokio::test]
async fn list_errors_are_classified_too() {
    use CloudErrorKind::*;
    for (name, status, want) in [
        ("RequestLimitExceeded", 503, rate_limited(1000)),
        ("AuthFailure", 401, Permanent),
        ("Unavailable", 503, Transient),
    ] {
        let file = format!("error-{name}.xml");
        let server = FixtureServer::start(move |_| (status, file.clone())).await;
        let d = server.driver(serde_json::json!({}));
        let err = list(&d, &BTreeMap::new()).await.expect_err("error");
        assert_eq!(err.kind, want, "{name}: {err}");
    }
}

#[tokio::test]
async fn throttling_backoff_grows_resets_and_is_per_call_kind() {
    let throttle = Arc::new(Mutex::new(true));
    let t = throttle.clone();
    let server = FixtureServer::start(move |c| {
        if *t.lock().expect("lock") {
            (503, "error-RequestLimitExceeded.xml".into())
        } else if c.action() == "RunInstances" {
            (200, "RunInstances-ok.xml".into())
        } else {
            (200, "DescribeInstances-page2.xml".into())
        }
    })
    .await;
    let d = server.driver(serde_json::json!({}));
    // No subnet configured: the start counter's series are pre-created for "".
    assert_eq!(starts(&d), want_starts(&[("", "0", 0), ("", "1", 0)]));
    assert_eq!(instances_gauge(&d), None, "no listing yet");
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(
            create(&d, request("m5.large"))
                .await
                .expect_err("throttled")
                .kind,
        );
    }
    assert_eq!(
        got,
        [
            rate_limited(1000),
            rate_limited(2500),
            rate_limited(4750),
            rate_limited(8125)
        ]
    );
    // The list backoff is separate: it starts at 1 s.
    let err = list(&d, &BTreeMap::new()).await.expect_err("throttled");
    assert_eq!(err.kind, rate_limited(1000));
    // A success resets the create backoff.
    *throttle.lock().expect("lock") = false;
    create(&d, request("m5.large")).await.expect("created");
    *throttle.lock().expect("lock") = true;
    let err = create(&d, request("m5.large"))
        .await
        .expect_err("throttled");
    assert_eq!(err.kind, rate_limited(1000));
    // Every attempt counts, throttled or not.
    assert_eq!(starts(&d), want_starts(&[("", "0", 5), ("", "1", 1)]));
    // The list backoff was not reset by the create success.
    let err = list(&d, &BTreeMap::new()).await.expect_err("throttled");
    assert_eq!(err.kind, rate_limited(2500));
    // A non-throttle error resets it.
    *throttle.lock().expect("lock") = false;
    list(&d, &BTreeMap::new()).await.expect("listed");
    *throttle.lock().expect("lock") = true;
    let err = list(&d, &BTreeMap::new()).await.expect_err("throttled");
    assert_eq!(err.kind, rate_limited(1000));
}

#[tokio::test]
async fn full_subnet_then_good_one_and_the_next_create_starts_on_the_good_one() {
    let server = FixtureServer::start(|c| match c.subnet() {
        "subnet-full" => (400, "error-InsufficientFreeAddressesInSubnet.xml".into()),
        _ => (200, "RunInstances-ok.xml".into()),
    })
    .await;
    let d = server.driver(serde_json::json!({"SubnetID": ["subnet-full", "subnet-good"]}));
    let inst = create(&d, request("m5.large")).await.expect("created");
    assert_eq!(inst.id, "i-0fixture000000001");
    assert_eq!(inst.address, "10.1.2.3");
    assert_eq!(inst.provider_type, "m5.large");
    assert_eq!(inst.remote_user, "crunch");
    assert_eq!(server.run_subnets(), ["subnet-full", "subnet-good"]);
    assert_eq!(d.next_subnet_index(), 1);
    assert_eq!(
        starts(&d),
        want_starts(&[
            ("subnet-full", "0", 1),
            ("subnet-full", "1", 0),
            ("subnet-good", "0", 0),
            ("subnet-good", "1", 1),
        ])
    );
    create(&d, request("m5.large")).await.expect("created");
    assert_eq!(
        server.run_subnets(),
        ["subnet-full", "subnet-good", "subnet-good"]
    );
    assert_eq!(
        starts(&d),
        want_starts(&[
            ("subnet-full", "0", 1),
            ("subnet-full", "1", 0),
            ("subnet-good", "0", 0),
            ("subnet-good", "1", 2),
        ])
    );
}

#[tokio::test]
async fn full_and_invalid_subnets_surface_each_others_errors() {
    let server = FixtureServer::start(|c| match c.subnet() {
        "subnet-full" => (400, "error-InvalidParameterValue-subnet.xml".into()),
        _ => (400, "error-InvalidSubnetID.NotFound.xml".into()),
    })
    .await;
    let d = server.driver(serde_json::json!({"SubnetID": ["subnet-full", "subnet-invalid"]}));
    let err = create(&d, request("m5.large")).await.expect_err("fails");
    assert!(err.message.contains("InvalidSubnetID.NotFound"), "{err}");
    assert_eq!(err.kind, CloudErrorKind::Permanent);
    // Series in label order: "subnet-full" sorts before "subnet-invalid".
    assert_eq!(
        starts(&d),
        want_starts(&[
            ("subnet-full", "0", 1),
            ("subnet-full", "1", 0),
            ("subnet-invalid", "0", 1),
            ("subnet-invalid", "1", 0),
        ])
    );
    let err = create(&d, request("m5.large")).await.expect_err("fails");
    assert!(err.message.contains("Not enough free addresses"), "{err}");
    assert_eq!(
        starts(&d),
        want_starts(&[
            ("subnet-full", "0", 2),
            ("subnet-full", "1", 0),
            ("subnet-invalid", "0", 2),
            ("subnet-invalid", "1", 0),
        ])
    );
    assert_eq!(
        server.run_subnets(),
        [
            "subnet-full",
            "subnet-invalid",
            "subnet-invalid",
            "subnet-full"
        ]
    );
}

#[tokio::test]
async fn capacity_error_wins_over_a_later_subnet_error() {
    let server = FixtureServer::start(|c| match c.subnet() {
        "subnet-full" => (400, "error-InvalidParameterValue-ipv4.xml".into()),
        _ => (500, "error-InsufficientInstanceCapacity.xml".into()),
    })
    .await;
    let d = server.driver(serde_json::json!({"SubnetID": ["subnet-full", "subnet-nocap"]}));
    for _ in 0..3 {
        let err = create(&d, request("m5.large")).await.expect_err("fails");
        assert_eq!(
            err.kind,
            CloudErrorKind::Capacity(CapacityScope::InstanceType),
            "{err}"
        );
        assert!(
            err.message.contains("InsufficientInstanceCapacity"),
            "{err}"
        );
    }
    assert_eq!(server.run_subnets().len(), 6);
    assert_eq!(
        starts(&d),
        want_starts(&[
            ("subnet-full", "0", 3),
            ("subnet-full", "1", 0),
            ("subnet-nocap", "0", 3),
            ("subnet-nocap", "1", 0),
        ])
    );
}

#[tokio::test]
async fn a_non_subnet_error_stops_the_failover() {
    let server = FixtureServer::start(|_| (400, "error-InstanceLimitExceeded.xml".into())).await;
    let d = server.driver(serde_json::json!({"SubnetID": ["subnet-a", "subnet-b", "subnet-c"]}));
    let err = create(&d, request("m5.large")).await.expect_err("fails");
    assert_eq!(err.kind, CloudErrorKind::Quota);
    assert_eq!(server.run_subnets(), ["subnet-a"]);
    assert_eq!(d.next_subnet_index(), 0);
    // The subnets not tried keep their pre-created series at 0.
    assert_eq!(
        starts(&d),
        want_starts(&[
            ("subnet-a", "0", 1),
            ("subnet-a", "1", 0),
            ("subnet-b", "0", 0),
            ("subnet-b", "1", 0),
            ("subnet-c", "0", 0),
            ("subnet-c", "1", 0),
        ])
    );
}

#[tokio::test]
async fn list_pages_until_an_empty_token_and_skips_gone_instances() {
    let server = FixtureServer::start(|c| match c.params.get("NextToken").map(String::as_str) {
        None => (200, "DescribeInstances-page1.xml".into()),
        Some("page2") => (200, "DescribeInstances-page2.xml".into()),
        Some(other) => panic!("unexpected NextToken {other:?}"),
    })
    .await;
    let d = server.driver(serde_json::json!({}));
    let filter: BTreeMap<String, String> = [(
        "ArvadosInstanceSetID".to_string(),
        "zzzzz-gj3su-000000000000000".to_string(),
    )]
    .into();
    let got = list(&d, &filter).await.expect("listed");
    let ids: Vec<&str> = got.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(
        ids,
        ["i-0page1running", "i-0page2pending", "i-0page2stopped"]
    );
    assert_eq!(got[0].address, "10.1.0.1");
    assert_eq!(got[1].address, "");
    assert_eq!(got[1].provider_type, "c5.xlarge");
    assert_eq!(
        got[0].tags.get("ArvadosInstanceSetID").map(String::as_str),
        Some("zzzzz-gj3su-000000000000000")
    );
    let calls = server.calls();
    assert_eq!(calls.len(), 2, "an empty nextToken ends the listing");
    for c in &calls {
        assert_eq!(c.action(), "DescribeInstances");
        assert_eq!(
            c.params.get("Filter.1.Name").map(String::as_str),
            Some("tag:ArvadosInstanceSetID")
        );
        assert_eq!(
            c.params.get("Filter.1.Value.1").map(String::as_str),
            Some("zzzzz-gj3su-000000000000000")
        );
    }
}

#[tokio::test]
async fn instances_gauge_counts_the_last_listing_per_subnet() {
    let reply = Arc::new(Mutex::new("DescribeInstances-subnets.xml"));
    let r = reply.clone();
    let server = FixtureServer::start(move |_| {
        let file = *r.lock().expect("lock");
        let status = if file.starts_with("error-") { 503 } else { 200 };
        (status, file.to_string())
    })
    .await;
    let d = server.driver(serde_json::json!({"SubnetID": ["subnet-b", "subnet-a"]}));
    assert_eq!(instances_gauge(&d), None, "absent until the first listing");
    let got = list(&d, &BTreeMap::new()).await.expect("listed");
    assert_eq!(got.len(), 4, "the terminated instance is skipped");
    let gauge = |rows: &[(&str, u32)]| -> Option<Vec<(String, f64)>> {
        Some(
            rows.iter()
                .map(|(s, n)| (s.to_string(), f64::from(*n)))
                .collect(),
        )
    };
    // "" (the instance without a subnet), both configured subnets (subnet-b has none), and
    // the unconfigured subnet an instance is in.
    assert_eq!(
        instances_gauge(&d),
        gauge(&[
            ("", 1),
            ("subnet-a", 2),
            ("subnet-b", 0),
            ("subnet-other", 1)
        ])
    );
    // A failed listing leaves the gauge as it was.
    *reply.lock().expect("lock") = "error-Unavailable.xml";
    list(&d, &BTreeMap::new()).await.expect_err("fails");
    assert_eq!(
        instances_gauge(&d),
        gauge(&[
            ("", 1),
            ("subnet-a", 2),
            ("subnet-b", 0),
            ("subnet-other", 1)
        ])
    );
    // An empty listing sets every series to 0, including the subnet seen before.
    *reply.lock().expect("lock") = "DescribeInstances-empty.xml";
    assert!(list(&d, &BTreeMap::new()).await.expect("listed").is_empty());
    assert_eq!(
        instances_gauge(&d),
        gauge(&[
            ("", 0),
            ("subnet-a", 0),
            ("subnet-b", 0),
            ("subnet-other", 0)
        ])
    );
    // Listing does not touch the start counter.
    assert_eq!(
        starts(&d),
        want_starts(&[
            ("subnet-a", "0", 0),
            ("subnet-a", "1", 0),
            ("subnet-b", "0", 0),
            ("subnet-b", "1", 0),
        ])
    );
}

/// A plain HTTP/1.1 GET on loopback with a bearer token: (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str, token: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("answered before the deadline")
        .expect("read");
    let text = String::from_utf8(buf).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let status = head.lines().next().unwrap_or("").to_string();
    (status, body.to_string())
}

/// `promtool check metrics` (Debian package prometheus, which scripts/test installs) must find
/// no problem in `text` other than its lint about Go's own names (counters without `_total`,
/// gauges named `*_total`), which are parity.
async fn promtool_check(text: &str) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool (Debian package prometheus) could not be started ({e}); run scripts/test, which installs it")
        });
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).await.expect("write");
    drop(stdin);
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("promtool finished before the deadline")
        .expect("promtool runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let allowed = [
        "counter metrics should have \"_total\" suffix",
        "non-counter metrics should not have \"_total\" suffix",
    ];
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            allowed.iter().any(|a| line.contains(a)) && !line.contains("ec2_"),
            "promtool reported a problem: {line}\nfull report:\n{report}"
        );
    }
    // 0: clean; 3: lint findings only.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "promtool failed with {:?}: {report}",
        out.status
    );
}

#[tokio::test]
async fn driver_families_appear_in_the_management_api_metrics() {
    use arvados_dispatch_cloud::core::Dispatcher;
    use arvados_dispatch_cloud::core::config::Config;
    use arvados_dispatch_cloud::core::dispatcher::Options;
    use arvados_dispatch_cloud::core::pool::remote::RunnerSpec;
    use arvados_dispatch_cloud::http::{ApiState, router};

    let server = FixtureServer::start(|c| match (c.action(), c.subnet()) {
        ("RunInstances", "subnet-full") => {
            (400, "error-InsufficientFreeAddressesInSubnet.xml".into())
        }
        ("RunInstances", _) => (200, "RunInstances-ok.xml".into()),
        _ => (200, "DescribeInstances-subnets.xml".into()),
    })
    .await;
    let d =
        Arc::new(server.driver(serde_json::json!({"SubnetID": ["subnet-full", "subnet-good"]})));
    create(&d, request("m5.large")).await.expect("created");
    list(&d, &BTreeMap::new()).await.expect("listed");

    // The driver's families through the text encoder, as Go's test matches them.
    let text = encode_text(&d.metric_families());
    for line in [
        "arvados_dispatchcloud_ec2_instance_starts_total{subnet_id=\"subnet-full\",success=\"0\"} 1\n",
        "arvados_dispatchcloud_ec2_instance_starts_total{subnet_id=\"subnet-full\",success=\"1\"} 0\n",
        "arvados_dispatchcloud_ec2_instance_starts_total{subnet_id=\"subnet-good\",success=\"0\"} 0\n",
        "arvados_dispatchcloud_ec2_instance_starts_total{subnet_id=\"subnet-good\",success=\"1\"} 1\n",
        "arvados_dispatchcloud_ec2_instances{subnet_id=\"subnet-a\"} 2\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from\n{text}");
    }

    // The same families on /metrics and /metrics.json, next to the dispatcher's, in name order.
    let dispatcher = Dispatcher::new(
        Config::default(),
        Options {
            seed: 1,
            instance_set_id: "zzzzz-gj3su-000000000000000".into(),
            runner: RunnerSpec::installed("crunch-run"),
        },
        Timestamp(T0),
    );
    let driver = d.clone();
    let state = ApiState::new(
        Arc::new(Mutex::new(dispatcher)),
        Arc::new(tokio::sync::Notify::new()),
        "metrics-test-token".into(),
        Arc::new(|| Timestamp(T0)),
    )
    .with_extra_metrics(Arc::new(move || driver.metrics()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    let app = router(state);
    let api = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    let (status, body) = http_get(addr, "/metrics", "metrics-test-token").await;
    assert!(status.contains(" 200 "), "{status}: {body}");
    for line in text.lines() {
        assert!(
            body.contains(&format!("{line}\n")),
            "{line:?} missing from\n{body}"
        );
    }
    assert!(body.contains("# TYPE arvados_dispatchcloud_ec2_instance_starts_total counter\n"));
    assert!(body.contains("# TYPE arvados_dispatchcloud_ec2_instances gauge\n"));
    assert!(body.contains("# TYPE arvados_dispatchcloud_driver_operations counter\n"));
    let names: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(names, sorted, "families sorted by name, each once");
    promtool_check(&body).await;
    let (status, body) = http_get(addr, "/metrics.json", "metrics-test-token").await;
    assert!(status.contains(" 200 "), "{status}: {body}");
    let fams: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let starts_json = fams
        .as_array()
        .expect("array")
        .iter()
        .find(|f| f["name"] == "arvados_dispatchcloud_ec2_instance_starts_total")
        .expect("the start counter in /metrics.json");
    assert_eq!(starts_json["type"], 0, "a counter");
    assert_eq!(starts_json["metric"].as_array().expect("metric").len(), 4);
    api.abort();
}

#[tokio::test]
async fn destroy_and_set_tags_errors() {
    let server = FixtureServer::start(|c| match c.action() {
        "TerminateInstances" => (400, "error-InvalidInstanceID.NotFound.xml".into()),
        _ => (503, "error-RequestLimitExceeded.xml".into()),
    })
    .await;
    let d = server.driver(serde_json::json!({}));
    let err = tokio::time::timeout(DEADLINE, d.destroy("i-0123456789abcdef0"))
        .await
        .expect("deadline")
        .expect_err("not found");
    assert_eq!(err.kind, CloudErrorKind::NotFound, "{err}");
    let err = tokio::time::timeout(DEADLINE, d.set_tags("i-0123456789abcdef0", BTreeMap::new()))
        .await
        .expect("deadline")
        .expect_err("throttled");
    // Go only logs Destroy and SetTags errors; a throttled one is worth retrying.
    assert_eq!(err.kind, CloudErrorKind::Transient, "{err}");
    let actions: Vec<String> = server
        .calls()
        .iter()
        .map(|c| c.action().to_string())
        .collect();
    assert_eq!(actions, ["TerminateInstances", "CreateTags"]);
    assert_eq!(
        server.calls()[0]
            .params
            .get("InstanceId.1")
            .map(String::as_str),
        Some("i-0123456789abcdef0")
    );
}

#[tokio::test]
async fn a_refused_connection_is_transient() {
    // Bind and drop a listener to get a loopback port that nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let d = driver_at(&format!("http://127.0.0.1:{port}"), serde_json::json!({}));
    let err = create(&d, request("m5.large"))
        .await
        .expect_err("no server");
    assert_eq!(err.kind, CloudErrorKind::Transient, "{err}");
    assert!(!err.message.contains(SECRET), "{err}");
}

#[tokio::test]
async fn run_instances_request_shape() {
    let server = FixtureServer::start(|_| (200, "RunInstances-ok.xml".into())).await;
    let d = server.driver(serde_json::json!({
        "SubnetID": "subnet-a",
        "SecurityGroupIDs": ["sg-2", "sg-1"],
        "IAMInstanceProfile": "crunch-profile",
        "EBSVolumeType": "gp3",
    }));
    let mut req = request("m5.large");
    let mut t = (*req.instance_type).clone();
    t.preemptible = true;
    t.price = 0.00001;
    t.added_scratch = (50 << 30) + 1;
    req.instance_type = Arc::new(t);
    create(&d, req).await.expect("created");
    let calls = server.calls();
    assert_eq!(calls.len(), 1);
    let p = &calls[0].params;
    let want: &[(&str, &str)] = &[
        ("Action", "RunInstances"),
        ("ImageId", "ami-0123"),
        ("InstanceType", "m5.large"),
        ("MinCount", "1"),
        ("MaxCount", "1"),
        ("DisableApiTermination", "false"),
        ("InstanceInitiatedShutdownBehavior", "terminate"),
        ("NetworkInterface.1.DeviceIndex", "0"),
        ("NetworkInterface.1.AssociatePublicIpAddress", "false"),
        ("NetworkInterface.1.DeleteOnTermination", "true"),
        ("NetworkInterface.1.SubnetId", "subnet-a"),
        ("NetworkInterface.1.SecurityGroupId.1", "sg-1"),
        ("NetworkInterface.1.SecurityGroupId.2", "sg-2"),
        ("TagSpecification.1.ResourceType", "instance"),
        ("MetadataOptions.HttpEndpoint", "enabled"),
        ("MetadataOptions.HttpTokens", "required"),
        // base64 of "#!/bin/sh\necho hello\n".
        ("UserData", "IyEvYmluL3NoCmVjaG8gaGVsbG8K"),
        ("BlockDeviceMapping.1.DeviceName", "/dev/xvdt"),
        ("BlockDeviceMapping.1.Ebs.DeleteOnTermination", "true"),
        ("BlockDeviceMapping.1.Ebs.VolumeSize", "51"),
        ("BlockDeviceMapping.1.Ebs.VolumeType", "gp3"),
        ("InstanceMarketOptions.MarketType", "spot"),
        (
            "InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior",
            "terminate",
        ),
        ("InstanceMarketOptions.SpotOptions.MaxPrice", "1e-05"),
        ("IamInstanceProfile.Name", "crunch-profile"),
    ];
    for (k, v) in want {
        assert_eq!(p.get(*k).map(String::as_str), Some(*v), "{k} in {p:#?}");
    }
    // Tags go on the instance only: one tag specification, with every tag.
    assert!(!p.contains_key("TagSpecification.2.ResourceType"), "{p:#?}");
    let tags: BTreeMap<&str, &str> = (1..=4)
        .map(|i| {
            (
                p[&format!("TagSpecification.1.Tag.{i}.Key")].as_str(),
                p[&format!("TagSpecification.1.Tag.{i}.Value")].as_str(),
            )
        })
        .collect();
    assert_eq!(tags.get("ArvadosIdleBehavior"), Some(&"run"));
    assert_eq!(tags.get("ArvadosInstanceType"), Some(&"m5large"));
    assert!(!p.contains_key("KeyName"), "no key was given");
    assert!(!p.values().any(|v| v.contains(SECRET)));
}

/// Replies for a listing with spot instances: DescribeInstances, two pages of
/// DescribeInstanceStatus and two of DescribeSpotPriceHistory (or `zone_a_only`'s one page).
fn spot_script(c: &Call, zone_a_only: bool) -> (u16, String) {
    let token = c.params.get("NextToken").map(String::as_str);
    let file = match (c.action(), token) {
        ("DescribeInstances", None) => "DescribeInstances-spot.xml",
        ("DescribeInstanceStatus", None) => "DescribeInstanceStatus-page1.xml",
        ("DescribeInstanceStatus", Some("status2")) => "DescribeInstanceStatus-page2.xml",
        ("DescribeSpotPriceHistory", None) if zone_a_only => "DescribeSpotPriceHistory-zone-a.xml",
        ("DescribeSpotPriceHistory", None) => "DescribeSpotPriceHistory-page1.xml",
        ("DescribeSpotPriceHistory", Some("prices2")) => "DescribeSpotPriceHistory-page2.xml",
        other => panic!("unexpected call {other:?}"),
    };
    (200, file.to_string())
}

/// Milliseconds since the epoch of an RFC 3339 UTC time `2027-01-DDTHH:MM:SSZ`.
fn at(day: u64, hour: u64, min: u64) -> Timestamp {
    // 2027-01-15T08:00:00Z is T0.
    Timestamp(T0 + ((day * 24 + hour) * 60 + min) * 60_000 - (15 * 24 + 8) * 3_600_000)
}

fn by_id(list: &[InstanceInfo], id: &str) -> InstanceInfo {
    list.iter()
        .find(|i| i.id == id)
        .unwrap_or_else(|| panic!("{id} listed"))
        .clone()
}

fn actions(server: &FixtureServer) -> Vec<String> {
    server
        .calls()
        .iter()
        .map(|c| c.action().to_string())
        .collect()
}

#[tokio::test]
async fn spot_instances_are_listed_with_their_zones_normalised_price_history() {
    let zone_a_only = Arc::new(Mutex::new(false));
    let z = zone_a_only.clone();
    let server = FixtureServer::start(move |c| spot_script(c, *z.lock().expect("lock"))).await;
    let now = Arc::new(AtomicU64::new(T0));
    let d = driver_with_clock(
        &server.url(),
        serde_json::json!({"SpotPriceUpdateInterval": "1h", "EBSPrice": 0.1}),
        now.clone(),
    );
    let got = list(&d, &BTreeMap::new()).await.expect("listed");
    assert_eq!(got.len(), 3);

    // Zone a: 07:30 has 06:30's price and goes; the 05:30 duplicate (on both pages) goes; the
    // record without a price that parses and the one without a time are skipped.
    let a = by_id(&got, "i-0spota");
    let zone_a = vec![
        PricePoint {
            start_time: at(15, 6, 30),
            price: 0.04,
        },
        PricePoint {
            start_time: at(15, 5, 30),
            price: 0.038,
        },
    ];
    assert_eq!(a.price_history, zone_a);
    assert_eq!(a.scratch_gib_month_price, 0.1);
    // Zone b has its own history; the record without a zone is skipped.
    let b = by_id(&got, "i-0spotb");
    assert_eq!(
        b.price_history,
        [PricePoint {
            start_time: at(15, 7, 0),
            price: 0.05,
        }]
    );
    // On-demand instances get no prices.
    let od = by_id(&got, "i-0ondemand");
    assert!(od.price_history.is_empty(), "{od:?}");
    assert_eq!(od.scratch_gib_month_price, 0.0);

    // What the run probe sends for a type with 50 GiB + 1 byte of AddedScratch: each price plus
    // $0.10 × 51 GiB / 30 / 24 per hour.
    let t = InstanceType {
        name: "m5large-spot".into(),
        provider_type: "m5.large".into(),
        added_scratch: (50 << 30) + 1,
        preemptible: true,
        ..InstanceType::default()
    };
    let hourly = 0.1 * 51.0 / 30.0 / 24.0;
    assert_eq!(
        probe_prices(&a, &t),
        [
            PricePoint {
                start_time: at(15, 6, 30),
                price: 0.04 + hourly,
            },
            PricePoint {
                start_time: at(15, 5, 30),
                price: 0.038 + hourly,
            },
        ]
    );

    // The requests.
    let calls = server.calls();
    assert_eq!(
        actions(&server),
        [
            "DescribeInstances",
            "DescribeInstanceStatus",
            "DescribeInstanceStatus",
            "DescribeSpotPriceHistory",
            "DescribeSpotPriceHistory",
        ]
    );
    assert_eq!(
        calls[1]
            .params
            .get("IncludeAllInstances")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        calls[2].params.get("NextToken").map(String::as_str),
        Some("status2")
    );
    let sph = &calls[3].params;
    let want: &[(&str, &str)] = &[
        // now − 3 × SpotPriceUpdateInterval.
        ("StartTime", "2027-01-15T05:00:00Z"),
        ("Filter.1.Name", "instance-type"),
        ("Filter.1.Value.1", "m5.large"),
        ("Filter.2.Name", "product-description"),
        ("Filter.2.Value.1", "Linux/UNIX"),
    ];
    for (k, v) in want {
        assert_eq!(sph.get(*k).map(String::as_str), Some(*v), "{k} in {sph:#?}");
    }
    assert!(
        !sph.contains_key("Filter.1.Value.2"),
        "one value per type: {sph:#?}"
    );
    assert_eq!(
        calls[4].params.get("NextToken").map(String::as_str),
        Some("prices2")
    );

    // Within the interval (up to and including exactly one interval later): zones are looked up
    // again, prices are not, and the instances keep their histories.
    for later in [T0 + 30 * 60_000, T0 + 3_600_000] {
        now.store(later, Ordering::SeqCst);
        let n = server.calls().len();
        let got = list(&d, &BTreeMap::new()).await.expect("listed");
        assert_eq!(
            actions(&server)[n..],
            [
                "DescribeInstances",
                "DescribeInstanceStatus",
                "DescribeInstanceStatus"
            ]
        );
        assert_eq!(by_id(&got, "i-0spota").price_history, zone_a);
    }

    // After the interval: a refresh; the same records again change nothing.
    now.store(T0 + 3_600_001, Ordering::SeqCst);
    let n = server.calls().len();
    let got = list(&d, &BTreeMap::new()).await.expect("listed");
    assert_eq!(
        actions(&server)[n..],
        [
            "DescribeInstances",
            "DescribeInstanceStatus",
            "DescribeInstanceStatus",
            "DescribeSpotPriceHistory",
            "DescribeSpotPriceHistory",
        ]
    );
    assert_eq!(
        server.calls()[n + 3]
            .params
            .get("StartTime")
            .map(String::as_str),
        Some("2027-01-15T06:00:00.001Z")
    );
    assert_eq!(by_id(&got, "i-0spota").price_history, zone_a);
    assert_eq!(by_id(&got, "i-0spotb").price_history.len(), 1);

    // Zone b stops getting prices: its history is kept until it is 64 intervals old, then
    // dropped. Zone a gains the new price.
    *zone_a_only.lock().expect("lock") = true;
    now.store(T0 + 2 * 3_600_000 + 2, Ordering::SeqCst);
    let got = list(&d, &BTreeMap::new()).await.expect("listed");
    assert_eq!(by_id(&got, "i-0spotb").price_history.len(), 1);
    let mut zone_a_later = vec![PricePoint {
        start_time: at(18, 0, 0),
        price: 0.041,
    }];
    zone_a_later.extend(zone_a.iter().copied());
    assert_eq!(by_id(&got, "i-0spota").price_history, zone_a_later);
    now.store(T0 + 3_600_001 + 64 * 3_600_000 + 1, Ordering::SeqCst);
    let got = list(&d, &BTreeMap::new()).await.expect("listed");
    let b = by_id(&got, "i-0spotb");
    assert!(b.price_history.is_empty(), "{b:?}");
    assert_eq!(b.scratch_gib_month_price, 0.0);
    assert_eq!(by_id(&got, "i-0spota").price_history, zone_a_later);
}

#[tokio::test]
async fn spot_price_lookups_off_at_zero_and_on_by_default() {
    let server = FixtureServer::start(|c| spot_script(c, false)).await;
    let d = server.driver(serde_json::json!({"SpotPriceUpdateInterval": "0s", "EBSPrice": 0.1}));
    let got = list(&d, &BTreeMap::new()).await.expect("listed");
    assert_eq!(actions(&server), ["DescribeInstances"]);
    assert!(got.iter().all(|i| i.price_history.is_empty()), "{got:?}");
    assert!(got.iter().all(|i| i.scratch_gib_month_price == 0.0));

    // Unset: 24h, as Arvados ships it (StartTime three days back).
    let server = FixtureServer::start(|c| spot_script(c, false)).await;
    let d = server.driver(serde_json::json!({}));
    let got = list(&d, &BTreeMap::new()).await.expect("listed");
    let calls = server.calls();
    assert_eq!(calls.len(), 5);
    assert_eq!(
        calls[3].params.get("StartTime").map(String::as_str),
        Some("2027-01-12T08:00:00Z")
    );
    let a = by_id(&got, "i-0spota");
    assert_eq!(a.price_history.len(), 2);
    // EBSPrice unset: nothing to add for the scratch volume.
    assert_eq!(a.scratch_gib_month_price, 0.0);
}

#[tokio::test]
async fn listing_without_spot_instances_looks_up_no_prices() {
    let server = FixtureServer::start(|c| match c.params.get("NextToken").map(String::as_str) {
        None => (200, "DescribeInstances-page1.xml".into()),
        _ => (200, "DescribeInstances-page2.xml".into()),
    })
    .await;
    let d = server.driver(serde_json::json!({"SpotPriceUpdateInterval": "1h"}));
    let got = list(&d, &BTreeMap::new()).await.expect("listed");
    assert_eq!(got.len(), 3);
    assert_eq!(actions(&server), ["DescribeInstances", "DescribeInstances"]);
}

#[tokio::test]
async fn price_lookup_errors_are_ignored() {
    for failing in ["DescribeInstanceStatus", "DescribeSpotPriceHistory"] {
        let server = FixtureServer::start(move |c| {
            if c.action() == failing {
                (503, "error-RequestLimitExceeded.xml".into())
            } else {
                spot_script(c, false)
            }
        })
        .await;
        let d = server.driver(serde_json::json!({"SpotPriceUpdateInterval": "1h"}));
        let got = list(&d, &BTreeMap::new()).await.expect("listed anyway");
        assert_eq!(got.len(), 3, "{failing}");
        // Without zones the keys are (m5.large, spot, ""), for which no record exists.
        assert!(
            got.iter().all(|i| i.price_history.is_empty()),
            "{failing}: {got:?}"
        );
        // Nothing was updated, so the next listing tries again.
        let n = server.calls().len();
        list(&d, &BTreeMap::new()).await.expect("listed");
        assert!(
            actions(&server)[n..].contains(&"DescribeSpotPriceHistory".to_string()),
            "{failing}"
        );
    }
}

fn test_key() -> PublicKey {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ec2/test-key-ed25519.pub");
    let text = std::fs::read_to_string(&p).expect("test key");
    PublicKey::from_openssh(text.trim()).expect("parses")
}

#[tokio::test]
async fn a_duplicate_key_pair_counts_as_imported() {
    let server = FixtureServer::start(|c| match c.action() {
        "DescribeKeyPairs" => (200, "DescribeKeyPairs-empty.xml".into()),
        "ImportKeyPair" => (400, "error-InvalidKeyPair.Duplicate.xml".into()),
        _ => (200, "RunInstances-ok.xml".into()),
    })
    .await;
    let d = server.driver(serde_json::json!({}));
    let key = test_key();
    let fp = arvados_dispatch_cloud::cloud::ec2::key_fingerprints(&key).expect("fingerprints")[0]
        .clone();
    let mut req = request("m5.large");
    req.public_key = Some(key);
    create(&d, req.clone()).await.expect("created");
    create(&d, req).await.expect("created");
    let calls = server.calls();
    // The duplicate is cached like an import: the second create goes straight to RunInstances.
    assert_eq!(
        actions(&server),
        [
            "DescribeKeyPairs",
            "ImportKeyPair",
            "RunInstances",
            "RunInstances"
        ]
    );
    let name = format!("arvados-dispatch-keypair-{fp}");
    assert_eq!(
        calls[1].params.get("KeyName").map(String::as_str),
        Some(name.as_str())
    );
    for c in &calls[2..] {
        assert_eq!(
            c.params.get("KeyName").map(String::as_str),
            Some(name.as_str())
        );
    }
}

#[tokio::test]
async fn other_key_pair_import_errors_fail_the_create() {
    let server = FixtureServer::start(|c| match c.action() {
        "DescribeKeyPairs" => (200, "DescribeKeyPairs-empty.xml".into()),
        "ImportKeyPair" => (401, "error-AuthFailure.xml".into()),
        _ => (200, "RunInstances-ok.xml".into()),
    })
    .await;
    let d = server.driver(serde_json::json!({}));
    let mut req = request("m5.large");
    req.public_key = Some(test_key());
    let err = create(&d, req).await.expect_err("import fails");
    assert_eq!(err.kind, CloudErrorKind::Permanent, "{err}");
    assert!(err.message.contains("Could not import keypair"), "{err}");
    assert!(err.message.contains("AuthFailure"), "{err}");
    assert_eq!(actions(&server), ["DescribeKeyPairs", "ImportKeyPair"]);
}
