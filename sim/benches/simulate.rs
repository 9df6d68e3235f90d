//! Simulator throughput: whole scenario runs, in simulated events per wall second.
//!
//! `cargo bench -p dispatch-sim --bench simulate`. Results and the command are recorded in
//! docs/benchmarks.md. The `large` scenario is measured separately with
//! `dispatch-sim run scenarios/large.yaml --json out.json` (one run takes too long for
//! criterion's repetitions).

use std::path::Path;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dispatch_sim::scenario::Scenario;
use dispatch_sim::world::World;

fn load(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(format!("{name}.yaml"));
    Scenario::load(&path).expect("scenario loads")
}

fn events(name: &str) -> u64 {
    let s = load(name);
    let seed = s.seed;
    let mut w = World::new(s, Path::new("."), seed, None).expect("world");
    w.run(|_, _| {});
    w.totals.events
}

fn simulate(c: &mut Criterion) {
    let mut g = c.benchmark_group("simulate");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    for name in [
        "quickstart",
        "arvados-chaos-200",
        "spot-storm",
        "restart-mid-run",
    ] {
        g.throughput(Throughput::Elements(events(name)));
        g.bench_with_input(BenchmarkId::from_parameter(name), &name, |b, name| {
            b.iter(|| {
                let s = load(name);
                let seed = s.seed;
                let mut w = World::new(s, Path::new("."), seed, None).expect("world");
                w.run(|_, _| {});
                std::hint::black_box(w.log.hash_hex())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, simulate);
criterion_main!(benches);
