//! `dispatch-sim`: run scenario simulations of the dispatcher on a simulated cloud.
//!
//! `dispatch-sim run SCENARIO.yaml [--seed N] [--json FILE] [--log FILE]` prints a summary and
//! exits 0 when the run passed (no invariant violation, every `expect:` line held), 1 when it did
//! not, 2 when the scenario could not be loaded.
//!
//! `dispatch-sim sweep SWEEP.yaml --out DIR [--threads N]` runs a pricing-policy sweep (see
//! docs/pricing.md) and writes results.csv, results.json, recommendation.yml and report.html.
//!
//! `dispatch-sim run SCENARIO.yaml --snapshot-at 45m --snapshot-out FILE` stops the run there
//! and writes the dispatcher's snapshot; `dispatch-sim whatif --from URL|FILE --change K=V
//! --hours N` forks a snapshot into the simulator with and without the changes (docs/pricing.md,
//! "What-if").

// The command line is the simulator's edge: it may read files and the wall clock; the world
// itself may not (clippy.toml).
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

mod fastalloc;

/// Small blocks come from per-thread free lists (see `fastalloc`): a third less CPU time for
/// a large scenario than glibc's malloc.
#[global_allocator]
static GLOBAL: fastalloc::FastAlloc = fastalloc::FastAlloc;

/// Deterministic simulations of the Arvados cloud dispatcher.
#[derive(Debug, Parser)]
#[command(name = "dispatch-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one scenario and print its summary.
    Run {
        /// The scenario file.
        scenario: PathBuf,
        /// Root seed (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
        /// Write the summary as JSON here.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Write the canonical event log here.
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// Stop the run at this simulated time (a Go duration such as 45m) and write the
        /// dispatcher's snapshot to --snapshot-out; the `expect:` block is not evaluated.
        #[arg(long, value_name = "DURATION", requires = "snapshot_out")]
        snapshot_at: Option<String>,
        /// Where --snapshot-at writes the snapshot (JSON).
        #[arg(long, value_name = "FILE", requires = "snapshot_at")]
        snapshot_out: Option<PathBuf>,
    },
    /// Fork a dispatcher's snapshot into the simulator and compare the next hours with and
    /// without config changes.
    Whatif {
        /// A snapshot file, or the dispatcher's management API: http://HOST:PORT (the snapshot
        /// route is added when the URL has no path).
        #[arg(long, value_name = "URL|FILE")]
        from: String,
        /// The management token for a URL (default: $ARVADOS_API_TOKEN).
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
        /// A change for the second run: a sweep knob (MaxInstances=200, TimeoutIdle=5m) or a
        /// cluster config key path (Containers.CloudVMs.TimeoutBooting=20m,
        /// InstanceTypes.m5.large.Price=0.1). Repeatable.
        #[arg(long, value_name = "KEY=VALUE")]
        change: Vec<String>,
        /// Simulated hours after the snapshot.
        #[arg(long, default_value_t = 6.0)]
        hours: f64,
        /// Seed of the fork and of both runs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Take the cloud, controller and VM models from this scenario file.
        #[arg(long, value_name = "SCENARIO")]
        models: Option<PathBuf>,
        /// Directory for whatif.json, whatif.txt and whatif.html.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Run a pricing-policy sweep: a base scenario under a grid of policies × seeds, in parallel.
    Sweep {
        /// The sweep file.
        sweep: PathBuf,
        /// Directory for results.csv, results.json, recommendation.yml and report.html.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Worker threads (default: all cores); results do not depend on it.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Serve a stand-in Arvados controller over HTTP for end-to-end tests
    /// (see the `dispatch_sim::controller` docs for the workload format).
    Controller {
        /// Address to bind, e.g. 127.0.0.1:0; prints `listening on ADDR` once bound.
        #[arg(long)]
        listen: String,
        /// Workload file (YAML or JSON).
        #[arg(long, value_name = "FILE")]
        workload: PathBuf,
        /// The API token clients must send (default: $ARVADOS_API_TOKEN).
        #[arg(long)]
        token: Option<String>,
        /// Do not log requests on stderr.
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            scenario,
            seed,
            json,
            log,
            snapshot_at,
            snapshot_out,
        } => match (snapshot_at, snapshot_out) {
            (Some(at), Some(out)) => run_snapshot(&scenario, seed, json, log, &at, &out),
            _ => run(scenario, seed, json, log),
        },
        Command::Whatif {
            from,
            token,
            change,
            hours,
            seed,
            models,
            out,
        } => whatif(&from, token, &change, hours, seed, models, out),
        Command::Sweep {
            sweep,
            out,
            threads,
        } => run_sweep(&sweep, &out, threads),
        Command::Controller {
            listen,
            workload,
            token,
            quiet,
        } => match dispatch_sim::controller::main(&listen, &workload, token, quiet) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn run(
    scenario: PathBuf,
    seed: Option<u64>,
    json: Option<PathBuf>,
    log: Option<PathBuf>,
) -> ExitCode {
    let log_out: Option<Box<dyn std::io::Write>> = match &log {
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Some(Box::new(std::io::BufWriter::new(f))),
            Err(e) => {
                eprintln!("error: --log {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut shown = false;
    let progress = |now: u64, end: u64| {
        if tty && start.elapsed().as_secs_f64() > 2.0 {
            let frac = (now as f64 / end.max(1) as f64).min(1.0);
            let bar = (frac * 40.0) as usize;
            eprint!(
                "\r[{}{}] {:5.1}% of simulated time",
                "#".repeat(bar),
                ".".repeat(40 - bar),
                frac * 100.0
            );
            shown = true;
        }
    };
    let result = dispatch_sim::run_file(
        &scenario,
        seed,
        log_out,
        || start.elapsed().as_secs_f64(),
        progress,
    );
    if tty {
        eprint!("\r{:60}\r", "");
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", dispatch_sim::report::text(&report));
    if let Some(p) = json {
        let text = serde_json::to_string_pretty(&report).expect("the report serialises");
        if let Err(e) = std::fs::write(&p, text + "\n") {
            eprintln!("error: --json {}: {e}", p.display());
            return ExitCode::from(2);
        }
    }
    if !report.passed {
        let seed = report.seed;
        eprintln!(
            "replay: cargo run --release -p dispatch-sim -- run {} --seed {seed} --log events.log",
            scenario.display()
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn log_file(log: &Option<PathBuf>) -> Result<Option<Box<dyn std::io::Write>>, ExitCode> {
    match log {
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Ok(Some(Box::new(std::io::BufWriter::new(f)))),
            Err(e) => {
                eprintln!("error: --log {}: {e}", p.display());
                Err(ExitCode::from(2))
            }
        },
        None => Ok(None),
    }
}

fn run_snapshot(
    scenario: &std::path::Path,
    seed: Option<u64>,
    json: Option<PathBuf>,
    log: Option<PathBuf>,
    at: &str,
    out: &std::path::Path,
) -> ExitCode {
    let at = match arvados_dispatch_cloud::config::units::parse_duration(at) {
        Ok(ns) if ns > 0 => std::time::Duration::from_nanos(ns as u64),
        Ok(_) => {
            eprintln!("error: --snapshot-at {at:?}: must be more than 0");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: --snapshot-at {at:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let log_out = match log_file(&log) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let start = Instant::now();
    let (snap, w) =
        match dispatch_sim::whatif::snapshot_of_scenario(scenario, seed, at, log_out, |_, _| {}) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
    let mut report = dispatch_sim::report::build(&w, start.elapsed().as_secs_f64());
    // The run was cut at the snapshot: its expectations are about a whole run.
    report.expectations.clear();
    report.passed = report.invariant_violations == 0;
    print!("{}", dispatch_sim::report::text(&report));
    if let Some(p) = json {
        let text = serde_json::to_string_pretty(&report).expect("the report serialises");
        if let Err(e) = std::fs::write(&p, text + "\n") {
            eprintln!("error: --json {}: {e}", p.display());
            return ExitCode::from(2);
        }
    }
    let text = serde_json::to_string_pretty(&snap).expect("the snapshot serialises") + "\n";
    if let Err(e) = std::fs::write(out, text) {
        eprintln!("error: --snapshot-out {}: {e}", out.display());
        return ExitCode::from(2);
    }
    println!(
        "snapshot at {:.0} s: {} containers, {} instances, {:.1} arrivals/h -> {}",
        snap.taken_at_ms as f64 / 1000.0,
        snap.containers.len(),
        snap.instances.len(),
        snap.arrivals.per_hour,
        out.display()
    );
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn whatif(
    from: &str,
    token: Option<String>,
    changes: &[String],
    hours: f64,
    seed: u64,
    models: Option<PathBuf>,
    out: Option<PathBuf>,
) -> ExitCode {
    use dispatch_sim::whatif;
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    };
    let changes: Vec<whatif::Change> =
        match changes.iter().map(|c| whatif::Change::parse(c)).collect() {
            Ok(c) => c,
            Err(e) => return fail(&e),
        };
    let models = match models {
        Some(p) => match dispatch_sim::scenario::Scenario::load(&p) {
            Ok(s) => Some(s),
            Err(e) => return fail(&format!("--models: {e}")),
        },
        None => None,
    };
    let token = token.or_else(|| std::env::var("ARVADOS_API_TOKEN").ok());
    let snap = match whatif::load_snapshot(from, token.as_deref()) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let opts = whatif::Options {
        hours,
        seed,
        changes,
        models,
    };
    let outcome = match whatif::run(&snap, &whatif::source_name(from), &opts) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    print!("{}", whatif::text(&outcome));
    if let Some(dir) = out {
        if let Err(e) = whatif::write_outputs(&outcome, &dir) {
            return fail(&e);
        }
        println!(
            "wrote {}/{{whatif.json,whatif.txt,whatif.html}}",
            dir.display()
        );
    }
    ExitCode::SUCCESS
}

fn run_sweep(path: &std::path::Path, out: &std::path::Path, threads: Option<usize>) -> ExitCode {
    let sweep = match dispatch_sim::sweep::Sweep::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot start the worker threads: {e}");
            return ExitCode::from(2);
        }
    };
    let runs = sweep.policies.len() * sweep.seeds.len();
    eprintln!(
        "sweep {}: {} policies x {} seeds = {runs} runs on {} threads",
        sweep.file.name,
        sweep.policies.len(),
        sweep.seeds.len(),
        pool.current_num_threads()
    );
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let progress = |done: usize, total: usize| {
        let frac = done as f64 / total.max(1) as f64;
        if tty {
            let bar = (frac * 40.0) as usize;
            eprint!(
                "\r[{}{}] {done}/{total} runs, {:.0}s",
                "#".repeat(bar),
                ".".repeat(40 - bar),
                start.elapsed().as_secs_f64()
            );
        } else if done == total || done.is_multiple_of((total / 10).max(1)) {
            eprintln!("{done}/{total} runs, {:.0}s", start.elapsed().as_secs_f64());
        }
    };
    let outcome = pool.install(|| sweep.run(progress));
    if tty {
        eprintln!();
    }
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = dispatch_sim::sweep::write_outputs(&outcome, out) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let rec = &outcome.recommendation;
    match (rec.policy, &rec.saving) {
        (Some(i), Some(s)) => println!(
            "recommended {}: {:.1}% cheaper than the default (per seed {:.1}%..{:.1}%), mean p95 wait {:.0}s vs {:.0}s",
            outcome.policies[i].label,
            s.of_mean_cost_percent,
            s.min_percent,
            s.max_percent,
            outcome.policies[i].mean_wait_p95_s,
            outcome.policies[0].mean_wait_p95_s
        ),
        _ => println!(
            "no recommendation: {}",
            rec.reason.as_deref().unwrap_or_default()
        ),
    }
    println!(
        "wrote {}/{{results.csv,results.json,recommendation.yml,report.html}} in {:.1}s",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
