//! Tests of `dispatch-sim sweep`: knob application, determinism whatever the thread count, the
//! outputs, the spot-price model, and report.html rendered in headless Chromium.

#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dispatch_sim::sweep::{Outcome, Sweep, write_outputs};

const BASE: &str = r#"
name: tiny
seed: 1
duration: 6h
config:
  Clusters:
    zzzzz:
      SystemRootToken: simulatedsimulatedsimulatedsimulated00
      ManagementToken: simulatedmanagementtokensimulated00
      Containers:
        CloudVMs:
          Driver: ec2
          ImageID: ami-0123456789abcdef0
          DeployRunnerBinary: ""
          MaxInstances: 8
      InstanceTypes:
        small: {VCPUs: 2, RAM: 4GiB, IncludedScratch: 50GB, Price: 0.1}
        big: {VCPUs: 8, RAM: 32GiB, IncludedScratch: 200GB, Price: 0.4}
workload:
  generators:
    - count: 30
      arrival: {poisson: {per_hour: 60}}
      shape:
        vcpus: 1
        ram_gib: {uniform: [0.5, 2]}
        runtime: {uniform: [2m, 8m]}
    - count: 3
      arrival: {poisson: {per_hour: 6}}
      shape:
        vcpus: 1
        ram_gib: 1
        runtime: 1m
        priority: 600
      workflow:
        children: {uniform: [2, 5]}
        child_interval: {uniform: [10s, 1m]}
        child:
          vcpus: 2
          ram_gib: {uniform: [2, 12]}
          runtime: {uniform: [5m, 10m]}
"#;

const SWEEP: &str = r#"
name: tiny-sweep
base: base.yaml
seeds: [3, 1]
grid:
  MaximumPriceFactor: [1.0, 2.0]
  PreemptiblePriceFactor: [0, 0.5]
  AlwaysUsePreemptibleInstances: [false, true]
  TimeoutIdle: [1m, 5m]
default:
  MaximumPriceFactor: 1.5
  TimeoutIdle: 1m
spot_prices:
  small: 0.03
  big: 0.25
"#;

/// A fresh directory under the system temp dir, unique to this process and `name`.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dispatch-sim-sweep-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

fn write_sweep(dir: &Path, sweep: &str) -> PathBuf {
    std::fs::write(dir.join("base.yaml"), BASE).expect("write base");
    let p = dir.join("sweep.yaml");
    std::fs::write(&p, sweep).expect("write sweep");
    p
}

fn run_with_threads(sweep: &Sweep, threads: usize) -> Outcome {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    pool.install(|| sweep.run(|_, _| {})).expect("sweep runs")
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let dir = scratch("determinism");
    let sweep = Sweep::load(&write_sweep(&dir, SWEEP)).expect("load");
    // The default policy is not in the grid, so it is added as policy 0.
    assert_eq!(sweep.policies.len(), 1 + 16);
    assert_eq!(sweep.policies[0].policy.label, "default");
    let one = run_with_threads(&sweep, 1);
    let two = run_with_threads(&sweep, 2);
    let (j1, j2) = (
        dispatch_sim::sweep::json(&one),
        dispatch_sim::sweep::json(&two),
    );
    assert_eq!(j1, j2, "results differ between 1 and 2 threads");
    assert_eq!(
        dispatch_sim::sweep::csv(&one),
        dispatch_sim::sweep::csv(&two)
    );
    // Rows are sorted by (policy, seed), the seeds in the sweep file's order.
    assert_eq!(one.rows.len(), 17 * 2);
    for (i, r) in one.rows.iter().enumerate() {
        assert_eq!(r.policy, i / 2);
        assert_eq!(r.seed, [3, 1][i % 2]);
        assert_eq!(r.invariant_violations, 0, "{r:?}");
        assert!(r.completed > 0, "{r:?}");
    }
    // The default policy's instance series saw instances come and go.
    let (names, samples) = one.default_series.sampled(50);
    assert!(!names.is_empty());
    assert!(samples.iter().any(|(_, c)| c.iter().sum::<i64>() > 0));
    assert_eq!(samples.last().map(|s| s.1.iter().sum::<i64>()), Some(0));
}

#[test]
fn knobs_edit_the_cluster_config_and_spot_prices_bill_preemptible_hours() {
    let dir = scratch("knobs");
    let sweep = Sweep::load(&write_sweep(&dir, SWEEP)).expect("load");
    let find = |mpf: &str, ppf: &str, aup: &str, idle: &str| {
        sweep
            .policies
            .iter()
            .find(|p| {
                let v: Vec<String> = p
                    .policy
                    .values
                    .iter()
                    .map(|v| serde_yaml::to_string(v).expect("yaml").trim().to_string())
                    .collect();
                v == [mpf, ppf, aup, idle]
            })
            .unwrap_or_else(|| panic!("no policy {mpf} {ppf} {aup} {idle}"))
    };
    let p = find("2.0", "0.5", "true", "5m");
    let cluster = &p.scenario.config["Clusters"]["zzzzz"];
    assert_eq!(
        cluster["Containers"]["MaximumPriceFactor"].as_f64(),
        Some(2.0)
    );
    assert_eq!(
        cluster["Containers"]["CloudVMs"]["TimeoutIdle"].as_str(),
        Some("5m")
    );
    // The base config's own keys survive.
    assert_eq!(
        cluster["Containers"]["CloudVMs"]["MaxInstances"].as_i64(),
        Some(8)
    );
    // AlwaysUsePreemptibleInstances makes workflow children preemptible.
    let gen_ = &p.scenario.workload.generators[1];
    assert_eq!(
        gen_.workflow.as_ref().map(|w| w.child.preemptible),
        Some(1.0)
    );
    // small.preemptible bids 0.05 over a 0.03 market: billed at the market price.
    assert_eq!(p.billed_price.get("small.preemptible"), Some(&0.03));
    assert_eq!(p.billed_price.get("small"), Some(&0.1));
    // big.preemptible bids 0.2 under a 0.25 market: every launch fails.
    assert!(
        p.scenario
            .cloud
            .capacity
            .iter()
            .any(|c| c.instance_type.as_deref() == Some("big.preemptible") && c.probability == 1.0)
    );
    assert_eq!(p.billed_price.get("big.preemptible"), Some(&0.2));
    // Without preemptible types the flag changes nothing.
    let q = find("1.0", "0", "true", "1m");
    assert_eq!(
        q.scenario.workload.generators[1]
            .workflow
            .as_ref()
            .map(|w| w.child.preemptible),
        Some(0.0)
    );
}

#[test]
fn bad_sweep_files_are_errors_that_name_the_knob_and_value() {
    let dir = scratch("errors");
    let bad = SWEEP.replace("TimeoutIdle: [1m, 5m]", "TimeoutIdel: [1m]");
    let e = Sweep::load(&write_sweep(&dir, &bad)).expect_err("unknown knob");
    let msg = e.to_string();
    assert!(msg.contains("TimeoutIdel") && msg.contains("1m"), "{msg}");
    let bad = SWEEP.replace("TimeoutIdle: [1m, 5m]", "InstanceTypes: [nosuch]");
    let e = Sweep::load(&write_sweep(&dir, &bad)).expect_err("unknown catalogue");
    assert!(e.to_string().contains("nosuch"), "{e}");
    let bad = SWEEP.replace("TimeoutIdle: [1m, 5m]", "TimeoutIdle: []");
    let e = Sweep::load(&write_sweep(&dir, &bad)).expect_err("empty list");
    assert!(e.to_string().contains("grid.TimeoutIdle"), "{e}");
    let bad = SWEEP.replace("  TimeoutIdle: 1m\n", "  TimeoutProbe: 1m\n");
    let e = Sweep::load(&write_sweep(&dir, &bad)).expect_err("default knob not in grid");
    assert!(e.to_string().contains("default.TimeoutProbe"), "{e}");
}

#[test]
fn sampling_keeps_the_default_and_is_reproducible() {
    let dir = scratch("sample");
    let text = format!("{SWEEP}sample: {{count: 5, seed: 9}}\n");
    let a = Sweep::load(&write_sweep(&dir, &text)).expect("load");
    let b = Sweep::load(&write_sweep(&dir, &text)).expect("load");
    assert_eq!(a.policies.len(), 6);
    assert_eq!(a.policies[0].policy.label, "default");
    let vals = |s: &Sweep| -> Vec<Vec<serde_yaml::Value>> {
        s.policies.iter().map(|p| p.policy.values.clone()).collect()
    };
    assert_eq!(vals(&a), vals(&b));
}

/// The Chromium binary, if installed.
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|n| {
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(n))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .find(|p| p.is_file())
}

#[test]
fn report_html_renders_in_headless_chromium_with_non_empty_charts() {
    let dir = scratch("html");
    let small = SWEEP.replace("TimeoutIdle: [1m, 5m]", "TimeoutIdle: [1m]");
    let sweep = Sweep::load(&write_sweep(&dir, &small)).expect("load");
    let outcome = run_with_threads(&sweep, 2);
    let out = dir.join("out");
    write_outputs(&outcome, &out).expect("write outputs");
    for f in [
        "results.csv",
        "results.json",
        "recommendation.yml",
        "report.html",
    ] {
        let len = std::fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{f} is missing or empty");
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 1 + outcome.rows.len());
    let rec: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(out.join("recommendation.yml")).expect("yml"),
    )
    .expect("recommendation.yml is YAML");
    assert!(rec.get("recommended").is_some(), "{rec:?}");

    let Some(chromium) = chromium() else {
        panic!(
            "chromium is not installed: the report check needs it (apt-get install chromium; scripts/test installs it)"
        );
    };
    let profile = dir.join("profile");
    let html = out.join("report.html");
    let mut child = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", html.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
    // A generous deadline so that a hung browser fails the test instead of hanging it.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match child.try_wait().expect("wait for chromium") {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("chromium did not finish rendering report.html within 120 s");
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let output = child.wait_with_output().expect("chromium output");
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && dom.contains("</html>"),
        "chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // The Pareto chart: one point per policy, the default highlighted, the front marked.
    assert!(
        dom.contains(r#"<svg id="pareto""#),
        "no Pareto chart in the DOM"
    );
    let points = dom.matches(r#"class="point"#).count();
    assert_eq!(points, outcome.policies.len(), "Pareto points in the DOM");
    assert_eq!(
        dom.matches(r#" default""#).count(),
        1,
        "default highlighted once"
    );
    assert!(dom.matches(" pareto").count() >= 1, "no Pareto-front point");
    assert_eq!(
        dom.matches(r#"class="run""#).count(),
        outcome.rows.len(),
        "one grey dot per run"
    );
    // The instance charts: stacked areas with a non-empty path.
    assert!(dom.contains(r#"<svg id="instances-default""#));
    let series = dom.matches(r#"<path class="series""#).count();
    assert!(series >= 1, "no instance series in the DOM");
    assert!(
        !dom.contains(r#"d="Z""#),
        "an instance series has an empty path"
    );
}
