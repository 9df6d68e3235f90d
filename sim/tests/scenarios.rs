//! Scenario tests: every scenario file loads and passes; arvados-chaos-200 passes for seeds
//! 1..=200; same seed ⇒ same event log (in-process and in a child process); different seeds ⇒
//! different logs; golden hashes; bad scenario files give errors naming the field and value.
//!
//! Every failure message ends with the seed and the command that replays the run.

// Tests sit at the edge: they read files and the environment.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::path::{Path, PathBuf};

use dispatch_sim::report::Report;
use dispatch_sim::scenario::Scenario;
use dispatch_sim::world::World;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn scenario_path(name: &str) -> PathBuf {
    root().join("scenarios").join(format!("{name}.yaml"))
}

fn replay(name: &str, seed: u64) -> String {
    format!(
        "seed={seed}; replay: cargo run --release -p dispatch-sim -- run scenarios/{name}.yaml --seed {seed} --log events.log"
    )
}

/// Runs a scenario in-process; returns the report and the log text.
fn run(name: &str, seed: u64) -> (Report, String) {
    let path = scenario_path(name);
    let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let buf = SharedBuf::default();
    let mut w = World::new(
        s,
        path.parent().expect("dir"),
        seed,
        Some(Box::new(buf.clone())),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    w.run(|_, _| {});
    w.log.flush().expect("flush");
    let r = dispatch_sim::report::build(&w, 0.0);
    let text = String::from_utf8(buf.0.lock().expect("lock").clone()).expect("utf8");
    (r, text)
}

#[derive(Clone, Default)]
struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn first_difference(a: &str, b: &str) -> Option<(usize, String, String)> {
    let (mut la, mut lb) = (a.lines(), b.lines());
    for n in 1.. {
        match (la.next(), lb.next()) {
            (None, None) => return None,
            (x, y) if x != y => {
                return Some((n, x.unwrap_or("<end>").into(), y.unwrap_or("<end>").into()));
            }
            _ => {}
        }
    }
    None
}

fn assert_passed(name: &str, seed: u64, r: &Report) {
    let failed: Vec<_> = r.expectations.iter().filter(|e| !e.ok).collect();
    assert!(
        r.passed,
        "{name} failed: {failed:?}; violations {:?}\n{}",
        r.violations,
        replay(name, seed)
    );
}

#[test]
fn every_small_scenario_passes_with_its_own_seed() {
    let mut names: Vec<String> = std::fs::read_dir(root().join("scenarios"))
        .expect("scenarios/")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| p.file_stem().expect("stem").to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 7, "{names:?}");
    for name in names {
        let s = Scenario::load(&scenario_path(&name)).unwrap_or_else(|e| panic!("{e}"));
        if name == "large" {
            // Too big for the test tier; it is run by the benchmark (docs/benchmarks.md).
            continue;
        }
        let (r, _) = run(&name, s.seed);
        assert_passed(&name, s.seed, &r);
    }
}

fn chaos_seeds(range: std::ops::RangeInclusive<u64>) {
    for seed in range {
        let (r, _) = run("arvados-chaos-200", seed);
        assert_eq!(
            r.containers.total,
            200,
            "{}",
            replay("arvados-chaos-200", seed)
        );
        assert_eq!(
            r.containers.unfinished,
            0,
            "{}",
            replay("arvados-chaos-200", seed)
        );
        assert_eq!(
            r.instances.leaked,
            0,
            "{}",
            replay("arvados-chaos-200", seed)
        );
        assert_eq!(
            r.invariant_violations,
            0,
            "{:?} {}",
            r.violations,
            replay("arvados-chaos-200", seed)
        );
        assert_passed("arvados-chaos-200", seed, &r);
    }
}

#[test]
fn chaos_200_seeds_1_to_50() {
    chaos_seeds(1..=50);
}

#[test]
fn chaos_200_seeds_51_to_100() {
    chaos_seeds(51..=100);
}

#[test]
fn chaos_200_seeds_101_to_150() {
    chaos_seeds(101..=150);
}

#[test]
fn chaos_200_seeds_151_to_200() {
    chaos_seeds(151..=200);
}

#[test]
fn same_seed_same_log_different_seed_different_log() {
    for name in ["quickstart", "arvados-chaos-200"] {
        let (a, la) = run(name, 7);
        let (b, lb) = run(name, 7);
        if let Some((n, x, y)) = first_difference(&la, &lb) {
            panic!(
                "{name}: non-determinism at line {n}:\n  {x}\n  {y}\n{}",
                replay(name, 7)
            );
        }
        assert_eq!(a.event_log_hash, b.event_log_hash);
        let (c, _) = run(name, 8);
        assert_ne!(
            a.event_log_hash, c.event_log_hash,
            "{name}: seeds 7 and 8 gave the same log"
        );
    }
}

#[test]
fn same_seed_in_a_child_process() {
    let name = "quickstart";
    let (r, log) = run(name, 3);
    let dir = std::env::temp_dir().join(format!("dispatch-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let (log_path, json_path) = (dir.join("events.log"), dir.join("out.json"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dispatch-sim"))
        .arg("run")
        .arg(scenario_path(name))
        .args(["--seed", "3", "--log"])
        .arg(&log_path)
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run dispatch-sim");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        replay(name, 3)
    );
    let child_log = std::fs::read_to_string(&log_path).expect("log written");
    if let Some((n, x, y)) = first_difference(&log, &child_log) {
        panic!(
            "{name}: child process diverged at line {n}:\n  {x}\n  {y}\n{}",
            replay(name, 3)
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json"))
            .expect("valid json");
    assert_eq!(
        json["event_log_hash"],
        serde_json::Value::String(r.event_log_hash.clone())
    );
    for key in [
        "cost_usd",
        "invariant_violations",
        "events",
        "sim_seconds",
        "wall_seconds",
    ] {
        assert!(json[key].is_number(), "JSON lacks {key}");
    }
    for (obj, keys) in [
        ("containers", &["total", "completed", "cancelled"][..]),
        ("wait_seconds", &["p50", "p95", "max"][..]),
        ("instances", &["created", "leaked"][..]),
    ] {
        for k in keys {
            assert!(json[obj][k].is_number(), "JSON lacks {obj}.{k}");
        }
    }
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains(&r.event_log_hash), "{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Golden hashes: `UPDATE_GOLDEN=1 cargo test -p dispatch-sim --test scenarios golden` rewrites
/// them on purpose; review the log diff when they change.
#[test]
fn golden_hashes() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for name in ["quickstart", "arvados-chaos-200", "restart-mid-run"] {
        let s = Scenario::load(&scenario_path(name)).expect("loads");
        let (r, _) = run(name, s.seed);
        let path = root().join("fixtures/golden").join(format!("{name}.hash"));
        if update {
            std::fs::write(&path, format!("{}\n", r.event_log_hash)).expect("write golden");
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
                path.display()
            )
        });
        assert_eq!(
            r.event_log_hash,
            want.trim(),
            "{name}: event log changed; if on purpose, rerun with UPDATE_GOLDEN=1 and review.\n{}",
            replay(name, s.seed)
        );
    }
}

#[test]
fn bad_scenarios_name_the_field_and_value() {
    let base = std::fs::read_to_string(scenario_path("quickstart")).expect("quickstart");
    let cases = [
        (
            base.replace("duration: 4h", "duration: 4hours"),
            "duration",
            "4hours",
        ),
        (
            base.replace("duration: 4h", "duration: 4h\nbogus_field: 1"),
            "bogus_field",
            "bogus_field",
        ),
        (
            base.replace(
                "  ssh_ready: {uniform: [15s, 30s]}",
                "  ssh_ready: {uniform: [15s, 30s]}\n  create_error_rate: 1.5",
            ),
            "cloud.create_error_rate",
            "1.5",
        ),
        (
            base.replace(
                "      arrival: {poisson: {per_hour: 200}}",
                "      arrival: {poisson: {per_hour: -3}}",
            ),
            "per_hour",
            "-3",
        ),
        (
            base.replace("RAM: 8GiB", "RAM: 8GiBs"),
            "InstanceTypes.m5.large.RAM",
            "8GiBs",
        ),
    ];
    for (text, field, value) in cases {
        let err = match Scenario::parse(&text, "test.yaml") {
            Err(e) => e.to_string(),
            Ok(s) => match World::new(s, Path::new("."), 1, None) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("accepted a bad scenario ({field})"),
            },
        };
        assert!(
            err.contains(field) && err.contains(value),
            "error {err:?} should name {field} and {value}"
        );
    }
}
