//! The production shell under deterministic virtual time: the quickstart and arvados-chaos-200
//! scenarios run through `arvados_dispatch_cloud::runtime::Shell` (its real loop, tasks and
//! deadlines) with the simulator's models behind its adapters, on a current-thread tokio
//! runtime whose clock is paused and auto-advances.
//!
//! Each run must pass the simulator's ground truth (every container ends exactly once, never
//! two runs at once, no leaked instance, the core's `check_invariants()` after every step);
//! the same seed twice must give the same transcript hash; a different seed a different one.
//! Every failure names the seed and the command that replays the run.
//!
//! Run with: `cargo test -p dispatch-sim --features shell --test shell_sim`.

// Tests sit at the edge: they read files.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use dispatch_sim::adapters::{ShellRun, run_file};

fn scenario_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scenarios")
        .join(format!("{name}.yaml"))
}

fn replay(name: &str, seed: u64) -> String {
    format!(
        "seed={seed}; replay: SHELL_SIM_SEED={seed} SHELL_SIM_SCENARIO={name} cargo test -p dispatch-sim --features shell --test shell_sim -- --nocapture replay_from_env"
    )
}

/// Runs `name` with `seed` through the shell; also returns the transcript text.
fn run(name: &str, seed: u64) -> (ShellRun, String) {
    let buf = SharedBuf::default();
    let r = run_file(
        &scenario_path(name),
        Some(seed),
        Some(Box::new(buf.clone())),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}; {}", replay(name, seed)));
    let text = String::from_utf8(buf.0.lock().expect("transcript lock").clone())
        .unwrap_or_else(|e| panic!("{name}: transcript is not UTF-8: {e}"));
    (r, text)
}

/// Asserts the ground truth of one run.
fn assert_clean(r: &ShellRun, min_completed: usize) {
    let failures = r.failures();
    assert!(
        failures.is_empty(),
        "{}: ground truth failed:\n  {}\n{}",
        r.scenario,
        failures.join("\n  "),
        replay(&r.scenario, r.seed)
    );
    assert!(
        r.completed >= min_completed,
        "{}: only {} containers completed (want at least {min_completed}); {}",
        r.scenario,
        r.completed,
        replay(&r.scenario, r.seed)
    );
    assert!(
        r.instances_created > 0 && r.transcript_lines > 0,
        "{}: the shell created no instance or logged nothing; {}",
        r.scenario,
        replay(&r.scenario, r.seed)
    );
}

/// Asserts that two transcripts are identical, naming the first differing line.
fn assert_same(name: &str, seed: u64, a: &(ShellRun, String), b: &(ShellRun, String)) {
    if a.0.transcript_hash == b.0.transcript_hash && a.1 == b.1 {
        return;
    }
    let first =
        a.1.lines()
            .zip(b.1.lines())
            .enumerate()
            .find(|(_, (x, y))| x != y)
            .map(|(i, (x, y))| format!("line {}: {x:?} vs {y:?}", i + 1))
            .unwrap_or_else(|| {
                format!(
                    "one transcript is a prefix of the other ({} vs {} lines)",
                    a.1.lines().count(),
                    b.1.lines().count()
                )
            });
    panic!(
        "{name}: the same seed gave different transcripts ({} vs {}); first divergence at {first}; {}",
        a.0.transcript_hash,
        b.0.transcript_hash,
        replay(name, seed)
    );
}

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("transcript lock").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn quickstart_through_the_shell_is_clean_and_deterministic() {
    let a = run("quickstart", 1);
    assert_clean(&a.0, 50);
    let b = run("quickstart", 1);
    assert_same("quickstart", 1, &a, &b);
    let c = run("quickstart", 2);
    assert_clean(&c.0, 50);
    assert_ne!(
        a.0.transcript_hash,
        c.0.transcript_hash,
        "quickstart: seeds 1 and 2 gave the same transcript; {}",
        replay("quickstart", 2)
    );
}

#[test]
fn chaos_200_through_the_shell_is_clean_and_deterministic() {
    let a = run("arvados-chaos-200", 1);
    assert_clean(&a.0, 1);
    let b = run("arvados-chaos-200", 1);
    assert_same("arvados-chaos-200", 1, &a, &b);
    let c = run("arvados-chaos-200", 7);
    assert_clean(&c.0, 1);
    assert_ne!(
        a.0.transcript_hash,
        c.0.transcript_hash,
        "arvados-chaos-200: seeds 1 and 7 gave the same transcript; {}",
        replay("arvados-chaos-200", 7)
    );
}

#[test]
fn chaos_200_through_the_shell_a_few_more_seeds() {
    for seed in 2..=6 {
        let (r, _) = run("arvados-chaos-200", seed);
        assert_clean(&r, 1);
    }
}

/// Replays one run from `SHELL_SIM_SCENARIO` and `SHELL_SIM_SEED` (does nothing without them)
/// and prints its transcript hash; with `SHELL_SIM_LOG=FILE` it writes the transcript there.
#[test]
fn replay_from_env() {
    let (Ok(name), Ok(seed)) = (
        std::env::var("SHELL_SIM_SCENARIO"),
        std::env::var("SHELL_SIM_SEED"),
    ) else {
        return;
    };
    let seed: u64 = seed
        .parse()
        .unwrap_or_else(|e| panic!("SHELL_SIM_SEED {seed:?} is not a u64: {e}"));
    let (r, text) = run(&name, seed);
    if let Ok(path) = std::env::var("SHELL_SIM_LOG") {
        std::fs::write(&path, &text).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    println!(
        "{name} seed={seed}: transcript {} ({} lines), end t={}ms, {} completed, {} instances created",
        r.transcript_hash, r.transcript_lines, r.end_ms, r.completed, r.instances_created
    );
    assert_clean(&r, 0);
}
