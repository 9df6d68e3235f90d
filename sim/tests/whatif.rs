//! Tests of snapshots and `dispatch-sim whatif`: the snapshot of restart-mid-run and a what-if
//! on it give the same numbers and the same files twice (the acceptance), in-process and
//! through the command line; a lower MaxInstances costs less and waits longer; the rendered
//! config of every scenario loads back unchanged; a snapshot fetched over HTTP (from a plain
//! loopback server and, with feature `shell`, from the real management API) is the file's; bad
//! inputs give errors that name the thing and the value.

#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use arvados_dispatch_cloud::core::snapshot::{Snapshot, arvados_config};
use dispatch_sim::whatif::{self, Change, Options, WhatifError};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

fn restart_mid_run() -> PathBuf {
    repo().join("scenarios/restart-mid-run.yaml")
}

/// A fresh directory under the system temp dir, unique to this process and `name`.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dispatch-sim-whatif-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// restart-mid-run at 45 minutes: after the first restart (20m), before the second (47m),
/// with a long queue.
fn snapshot() -> Snapshot {
    let (s, w) = whatif::snapshot_of_scenario(
        &restart_mid_run(),
        None,
        Duration::from_secs(45 * 60),
        None,
        |_, _| {},
    )
    .expect("snapshot");
    assert_eq!(w.checker.violation_count, 0, "{:?}", w.checker.violations);
    s
}

fn options(hours: f64, changes: &[&str]) -> Options {
    Options {
        hours,
        seed: 1,
        changes: changes
            .iter()
            .map(|c| Change::parse(c).expect("change"))
            .collect(),
        models: None,
    }
}

#[test]
fn snapshot_of_restart_mid_run() {
    let s = snapshot();
    assert_eq!(s.taken_at_ms, 45 * 60 * 1000);
    assert_eq!(s.cluster_id, "zzzzz");
    assert!(s.containers.len() > 50, "{} containers", s.containers.len());
    assert!(!s.instances.is_empty());
    // The dispatcher restarted at 20 minutes: 25 minutes of history.
    assert_eq!(s.arrivals.observed_seconds, 25.0 * 60.0);
    assert!(s.arrivals.total > 0 && s.arrivals.per_hour > 100.0);
    assert!(s.arrivals.runtimes_observed > 0);
    for c in &s.arrivals.classes {
        for r in &c.runtime_seconds {
            // The scenario's run times are 5 to 30 minutes; polls add seconds.
            assert!((290.0..=1900.0).contains(r), "run time {r}");
        }
    }
    // Every running container is on an instance of the snapshot.
    for c in s.containers.iter().filter(|c| c.instance.is_some()) {
        let i = c.instance.as_deref().expect("instance");
        assert!(
            s.instances
                .iter()
                .any(|x| x.id == i && x.containers.contains(&c.uuid))
        );
    }
    // The same scenario and seed give the same snapshot.
    assert_eq!(
        serde_json::to_string(&s).expect("json"),
        serde_json::to_string(&snapshot()).expect("json")
    );
}

#[test]
fn whatif_on_restart_mid_run_gives_the_same_numbers_twice() {
    let s = snapshot();
    let opts = options(3.0, &["MaxInstances=10"]);
    let a = whatif::run(&s, "restart-mid-run@45m", &opts).expect("whatif");
    let b = whatif::run(&s, "restart-mid-run@45m", &opts).expect("whatif");
    assert_eq!(whatif::json(&a), whatif::json(&b));
    assert_eq!(whatif::text(&a), whatif::text(&b));
    assert_eq!(whatif::html(&a), whatif::html(&b));
    assert_eq!(a.baseline.invariant_violations, 0);
    assert_eq!(a.changed.invariant_violations, 0);
    // The fork: the snapshot's containers and instances, arrivals at the observed rate.
    assert!(a.snapshot.queued > 0 && a.snapshot.running > 0);
    assert_eq!(
        a.baseline.timeline[0].instances as usize,
        a.snapshot.instances
    );
    assert_eq!(a.baseline.timeline[0].queued, a.snapshot.queued);
    let expected = s.arrivals.per_hour * 3.0;
    let simulated = a.snapshot.arrivals_simulated as f64;
    assert!(
        (simulated - expected).abs() < 4.0 * expected.sqrt() + 5.0,
        "{simulated} arrivals simulated for {expected} expected"
    );
    assert_eq!(a.baseline.timeline.len(), 3 * 4 + 1);
    // Another seed draws another future.
    let other = whatif::run(
        &s,
        "restart-mid-run@45m",
        &Options {
            seed: 2,
            ..opts.clone()
        },
    )
    .expect("whatif");
    assert_ne!(
        other.baseline.event_log_hash, a.baseline.event_log_hash,
        "seed 2 should differ from seed 1"
    );
}

#[test]
fn fewer_instances_cost_less_and_wait_longer() {
    let s = snapshot();
    let o = whatif::run(
        &s,
        "restart-mid-run@45m",
        &options(3.0, &["MaxInstances=10"]),
    )
    .expect("whatif");
    let (b, c) = (&o.baseline, &o.changed);
    assert!(c.cost_usd < b.cost_usd, "{} vs {}", c.cost_usd, b.cost_usd);
    assert!(c.instance_hours < b.instance_hours);
    assert!(
        c.wait_p95_s > b.wait_p95_s,
        "{} vs {}",
        c.wait_p95_s,
        b.wait_p95_s
    );
    assert!(c.waiting_at_end > b.waiting_at_end);
    assert!(c.completed < b.completed);
    assert!(o.difference.cost_usd < 0.0 && o.difference.wait_p95_s > 0.0);
    // After the excess instances drained, at most 10 are alive.
    let late: Vec<i64> = c
        .timeline
        .iter()
        .filter(|p| p.hour >= 1.0)
        .map(|p| p.instances)
        .collect();
    assert!(late.iter().all(|n| *n <= 10), "{late:?}");
    // A higher cap waits less than a lower one.
    let more = whatif::run(
        &s,
        "restart-mid-run@45m",
        &options(3.0, &["MaxInstances=60"]),
    )
    .expect("whatif");
    assert!(more.changed.wait_p95_s <= b.wait_p95_s);
    assert!(more.changed.waiting_at_end <= b.waiting_at_end);
    // The baseline does not depend on the changes.
    assert_eq!(more.baseline.event_log_hash, b.event_log_hash);
}

#[test]
fn command_line_snapshot_and_whatif_are_byte_identical_twice() {
    let dir = scratch("cli");
    let bin = env!("CARGO_BIN_EXE_dispatch-sim");
    let mut outputs = Vec::new();
    for n in 0..2 {
        let snap = dir.join(format!("snap{n}.json"));
        let out = Command::new(bin)
            .args(["run", restart_mid_run().to_str().expect("path")])
            .args(["--snapshot-at", "45m", "--snapshot-out"])
            .arg(&snap)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("snapshot at 2700 s"), "{stdout}");
        let o = dir.join("out");
        let out = Command::new(bin)
            .args(["whatif", "--from"])
            .arg(dir.join("snap0.json"))
            .args(["--change", "MaxInstances=10", "--change", "TimeoutIdle=5m"])
            .args(["--hours", "2", "--out"])
            .arg(&o)
            .output()
            .expect("whatif");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("utf-8");
        assert!(
            stdout.contains("MaxInstances=10, TimeoutIdle=5m"),
            "{stdout}"
        );
        assert!(stdout.contains("wait p95, s"), "{stdout}");
        outputs.push((
            std::fs::read(&snap).expect("snapshot"),
            stdout,
            std::fs::read(o.join("whatif.json")).expect("json"),
            std::fs::read(o.join("whatif.html")).expect("html"),
            std::fs::read(o.join("whatif.txt")).expect("txt"),
        ));
    }
    assert!(outputs[0] == outputs[1], "two runs gave different outputs");
    let html = String::from_utf8(outputs[0].3.clone()).expect("utf-8");
    for id in ["id=\"queue\"", "instances-baseline", "instances-changed"] {
        assert!(html.contains(id), "no {id} in whatif.html");
    }
    let json: serde_json::Value = serde_json::from_slice(&outputs[0].2).expect("json");
    for key in ["baseline", "changed", "difference", "snapshot", "notes"] {
        assert!(json.get(key).is_some(), "no {key}");
    }
}

#[test]
fn rendered_configs_of_every_scenario_load_back() {
    let mut n = 0;
    for e in std::fs::read_dir(repo().join("scenarios")).expect("scenarios") {
        let p = e.expect("entry").path();
        if p.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let s = dispatch_sim::scenario::Scenario::load(&p).expect("scenario");
        let text = serde_yaml::to_string(&s.config).expect("yaml");
        let loaded = arvados_dispatch_cloud::config::load_str(&text, "scenario").expect("loads");
        let rendered = arvados_config(&loaded.core).to_string();
        let again = arvados_dispatch_cloud::config::load_str(&rendered, "rendered")
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(again.core, loaded.core, "{}", p.display());
        n += 1;
    }
    assert!(n >= 5);
}

// ----- bad inputs ---------------------------------------------------------------------------

fn err(r: Result<impl std::fmt::Debug, WhatifError>) -> String {
    r.expect_err("an error").to_string()
}

#[test]
fn bad_changes_name_the_change_and_the_value() {
    for (c, want) in [
        ("MaxInstances", "expected KEY=VALUE"),
        ("=5", "the key is empty"),
        ("MaxInstances=", "the value is empty"),
        ("Containers..MaxInstances=1", "empty part"),
        ("MaxInstances=[1, 2]", "not a single number"),
    ] {
        let e = err(Change::parse(c));
        assert!(e.contains(c) && e.contains(want), "{c}: {e}");
    }
    let s = snapshot();
    for (c, want) in [
        ("Bogus=1", "unknown knob"),
        ("MaxInstances=lots", "lots"),
        ("TimeoutIdle=soon", "soon"),
        (
            "Containers.CloudVMs.MaxInstancez=5",
            "MaxInstancez: unknown key",
        ),
        (
            "InstanceTypes.x9.large.Price=1",
            "no instance type \"x9.large\"",
        ),
        ("InstanceTypes=cheap", "cannot replace the whole catalogue"),
    ] {
        let e = err(whatif::run(&s, "snap", &options(1.0, &[c])));
        assert!(
            e.starts_with(&format!("--change {c}: ")) && e.contains(want),
            "{c}: {e}"
        );
    }
    // A change of a type's field with a dotted name applies.
    let o = whatif::run(
        &s,
        "snap",
        &options(0.5, &["InstanceTypes.m5.xlarge.Price=0.5"]),
    )
    .expect("whatif");
    assert!(o.notes.is_empty(), "{:?}", o.notes);
    // Dearer than r5.xlarge now: work moves there, and the running m5.xlarge bill more.
    let hours = |v: &whatif::Variant, t: &str| v.instance_hours_by_type.get(t).copied();
    assert!(
        hours(&o.changed, "r5.xlarge").unwrap_or(0.0)
            > hours(&o.baseline, "r5.xlarge").unwrap_or(0.0),
        "{:?} vs {:?}",
        o.changed.instance_hours_by_type,
        o.baseline.instance_hours_by_type
    );
    assert!(o.changed.cost_usd > o.baseline.cost_usd);
    // A change that changes nothing the dispatcher uses is noted.
    let o = whatif::run(&s, "snap", &options(0.5, &["MaxInstances=30"])).expect("whatif");
    assert!(
        o.notes
            .iter()
            .any(|n| n.contains("MaxInstances=30 changes nothing")),
        "{:?}",
        o.notes
    );
    for hours in [0.0, -1.0, f64::NAN, 1e9] {
        let e = err(whatif::run(&s, "snap", &options(hours, &[])));
        assert!(e.starts_with("--hours "), "{e}");
    }
}

#[test]
fn malformed_snapshots_are_errors_that_name_the_file() {
    let dir = scratch("malformed");
    let good = serde_json::to_value(snapshot()).expect("json");
    let mut cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "not JSON"),
        ("{}".into(), "format is missing"),
    ];
    let mut v = good.clone();
    v["version"] = 99.into();
    cases.push((v.to_string(), "version 99"));
    let mut v = good.clone();
    v["format"] = "something else".into();
    cases.push((v.to_string(), "format is \"something else\""));
    let mut v = good.clone();
    v.as_object_mut().expect("object").remove("containers");
    cases.push((v.to_string(), "missing field `containers`"));
    let mut v = good.clone();
    v["instances"][0]["price"] = "cheap".into();
    cases.push((v.to_string(), "invalid type"));
    let mut v = good;
    v["cluster_id"] = "yyyyy".into();
    cases.push((v.to_string(), "no Clusters.yyyyy"));
    for (n, (text, want)) in cases.into_iter().enumerate() {
        let p = dir.join(format!("bad{n}.json"));
        std::fs::write(&p, text).expect("write");
        let e = err(whatif::load_snapshot(p.to_str().expect("path"), None));
        assert!(
            e.contains(&format!("snapshot {}", p.display())) && e.contains(want),
            "{want}: {e}"
        );
    }
    let e = err(whatif::load_snapshot("/no/such/snapshot.json", None));
    assert!(e.contains("/no/such/snapshot.json"), "{e}");
    // The command line exits 2 with the message.
    let out = Command::new(env!("CARGO_BIN_EXE_dispatch-sim"))
        .args(["whatif", "--from"])
        .arg(dir.join("bad0.json"))
        .output()
        .expect("whatif");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad0.json") && stderr.contains("not JSON"),
        "{stderr}"
    );
}

// ----- over HTTP ----------------------------------------------------------------------------

/// A one-connection-at-a-time HTTP server on 127.0.0.1 that answers `body` to requests with
/// `Authorization: Bearer good-token` (chunked, as a streaming server would) and 401 to
/// others; it serves `requests` requests. Returns its port.
fn serve(body: String, requests: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.expect("accept");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            reader.read_line(&mut request_line).expect("request line");
            let mut authorised = false;
            loop {
                let mut l = String::new();
                reader.read_line(&mut l).expect("header");
                if l == "\r\n" || l.is_empty() {
                    break;
                }
                if l.trim_end() == "Authorization: Bearer good-token" {
                    authorised = true;
                }
            }
            let path_ok = request_line.starts_with("GET /arvados/v1/dispatch/snapshot HTTP/1.1");
            let reply = if authorised && path_ok {
                let mut r = String::from(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                );
                for chunk in body.as_bytes().chunks(4000) {
                    r.push_str(&format!("{:x}\r\n", chunk.len()));
                    r.push_str(std::str::from_utf8(chunk).expect("ascii JSON"));
                    r.push_str("\r\n");
                }
                r.push_str("0\r\n\r\n");
                r
            } else if !path_ok {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 19\r\n\r\n404 page not found\n"
                    .to_string()
            } else {
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\n\r\nUnauthorized\n".to_string()
            };
            let _ = stream.write_all(reply.as_bytes());
            let _ = stream.flush();
            let mut rest = Vec::new();
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = stream.read_to_end(&mut rest);
        }
    });
    port
}

#[test]
fn fetches_a_snapshot_over_http_with_the_token() {
    let s = snapshot();
    let port = serve(serde_json::to_string(&s).expect("json"), 3);
    let url = format!("http://127.0.0.1:{port}");
    let fetched = whatif::load_snapshot(&url, Some("good-token")).expect("fetch");
    // Compared with the same text read from a file (JSON floats are read back the same way).
    let text = serde_json::to_string(&s).expect("json");
    assert_eq!(
        fetched,
        whatif::parse_snapshot(&text, "file").expect("parse")
    );
    let e = err(whatif::load_snapshot(&url, Some("bad-token")));
    assert!(
        e.contains(&url) && e.contains("401") && e.contains("ARVADOS_API_TOKEN"),
        "{e}"
    );
    assert!(!e.contains("bad-token"), "the token is in the message: {e}");
    let e = err(whatif::load_snapshot(
        &format!("{url}/other"),
        Some("good-token"),
    ));
    assert!(e.contains("404"), "{e}");
}

#[test]
fn unreachable_and_unsupported_urls_are_clear_errors() {
    // A port that was just free on loopback: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let e = err(whatif::load_snapshot(
        &format!("http://127.0.0.1:{port}/arvados/v1/dispatch/snapshot?api_token=s3cr3t"),
        Some("tok"),
    ));
    assert!(
        e.contains(&format!(
            "cannot fetch the snapshot from http://127.0.0.1:{port}/arvados/v1/dispatch/snapshot: cannot connect to 127.0.0.1:{port}"
        )),
        "{e}"
    );
    assert!(!e.contains("s3cr3t"), "{e}");
    let e = err(whatif::load_snapshot("https://127.0.0.1:1/", None));
    assert!(e.contains("only http://"), "{e}");
    let e = err(whatif::load_snapshot("http://user:pw@127.0.0.1:1/", None));
    assert!(e.contains("--token") && !e.contains("pw"), "{e}");
}

/// The real management API (the production router, behind its token check) serving the
/// snapshot of the simulated dispatcher: `whatif --from http://...` gives the same outputs as
/// the snapshot file.
#[cfg(feature = "shell")]
#[test]
fn whatif_from_the_live_management_api() {
    use std::sync::{Arc, Mutex};

    use arvados_dispatch_cloud::core::{Dispatcher, Timestamp};
    use arvados_dispatch_cloud::http::{ApiState, router};

    let (file_snapshot, mut w) = whatif::snapshot_of_scenario(
        &restart_mid_run(),
        None,
        Duration::from_secs(45 * 60),
        None,
        |_, _| {},
    )
    .expect("snapshot");
    let now = Timestamp(w.now);
    let spare = dispatch_sim::world::dispatcher_options(&w.loaded, 1, 99);
    let d = std::mem::replace(&mut w.d, Dispatcher::new(w.loaded.core.clone(), spare, now));
    let token = w.loaded.secrets.management_token.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = rt.block_on(async {
        let state = ApiState::new(
            Arc::new(Mutex::new(d)),
            Arc::new(tokio::sync::Notify::new()),
            token.clone(),
            Arc::new(move || now),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            axum::serve(listener, router(state)).await.expect("serve");
        });
        addr
    });
    let url = format!("http://{addr}");
    let e = err(whatif::load_snapshot(&url, None));
    assert!(e.contains("401"), "{e}");
    let live = whatif::load_snapshot(&url, Some(&token)).expect("fetch from the live route");
    let text = serde_json::to_string_pretty(&file_snapshot).expect("json");
    let file_snapshot = whatif::parse_snapshot(&text, "file").expect("parse");
    assert_eq!(live, file_snapshot);
    let opts = options(1.0, &["MaxInstances=10"]);
    let a = whatif::run(&live, "x", &opts).expect("whatif");
    let b = whatif::run(&file_snapshot, "x", &opts).expect("whatif");
    assert_eq!(whatif::json(&a), whatif::json(&b));
    drop(rt);
}
