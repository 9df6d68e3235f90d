//! The scheduling pass at growing sizes: `plan(&Snapshot, now)` for 1k/10k/100k queued
//! containers × 100/1k/10k instances × 30 instance types.
//!
//! Inputs are built once per case, outside the timed loop, from a seeded [`Rng`], so every run
//! measures the same snapshot. They are shaped like a busy EC2 cluster:
//!
//! * 30 instance types: m5/c5/r5 families (2–96 vCPUs, 4–768 GiB, price proportional to size),
//!   three CUDA GPU types, six preemptible (spot) variants at about a third of the price.
//! * Instances whose types are drawn from that catalogue (small types more often): about 55%
//!   running 1–8 containers, 20% idle, 15% booting (a few of them creates still in flight),
//!   4% unknown, 3% shutting down, 3% on hold or draining.
//! * The queue: the containers running on those instances (Running, a tenth still Locked, a
//!   few with an exited crunch-run), capped at half the queue, and the rest waiting: 85% Queued,
//!   15% Locked, 2% priority 0, 3% supervisors, mostly 1–4 vCPU / 2–16 GiB, some 8–64 vCPU
//!   up to 512 GiB, a few GPU, a sixth preemptible.
//!
//! Eligible types come from the real `choose_instance_types` with the default
//! `ContainersConfig` (MaximumPriceFactor 1.5). `SchedState::initial(0, 0)` and MaxInstances 0
//! mean no concurrency limit: the pass visits every container, the worst case. Creates are
//! not throttled either (MaxConcurrentInstanceCreateOps 0), so every Locked container that
//! fits nowhere adds an instance to the plan.
//!
//! Run: `cargo bench --bench scheduler` (see docs/benchmarks.md for results).

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::Duration;

use arvados_dispatch_cloud::core::Timestamp;
use arvados_dispatch_cloud::core::config::ContainersConfig;
use arvados_dispatch_cloud::core::key::Key;
use arvados_dispatch_cloud::core::queue::QueueEntry;
use arvados_dispatch_cloud::core::rng::Rng;
use arvados_dispatch_cloud::core::scheduler::{Action, PoolLimits, SchedState, Snapshot, plan};
use arvados_dispatch_cloud::core::select::{TypeTable, choose_instance_types, resources_needed};
use arvados_dispatch_cloud::core::types::{
    Container, ContainerState, GpuRequest, GpuSpec, IdleBehavior, InstanceType, InstanceView,
    Mount, WorkerState,
};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const GIB: i64 = 1 << 30;
const MIB: i64 = 1 << 20;
const NOW: Timestamp = Timestamp(1_700_000_000_000);
const SEED: u64 = 0x5c4e_d01e;
const CONTAINERS: [usize; 3] = [1_000, 10_000, 100_000];
const INSTANCES: [usize; 3] = [100, 1_000, 10_000];
const DISPATCHER_TOKEN: &str = "zzzzz-gj3su-000000000000000";

/// One on-demand type: (name, vCPUs, RAM GiB, hourly price, GPUs).
type Row = (&'static str, i64, i64, f64, i64);

/// An EC2-like catalogue: 24 on-demand types.
const CATALOGUE: [Row; 24] = [
    ("c5.large", 2, 4, 0.085, 0),
    ("c5.xlarge", 4, 8, 0.17, 0),
    ("c5.2xlarge", 8, 16, 0.34, 0),
    ("c5.4xlarge", 16, 32, 0.68, 0),
    ("c5.9xlarge", 36, 72, 1.53, 0),
    ("c5.18xlarge", 72, 144, 3.06, 0),
    ("m5.large", 2, 8, 0.096, 0),
    ("m5.xlarge", 4, 16, 0.192, 0),
    ("m5.2xlarge", 8, 32, 0.384, 0),
    ("m5.4xlarge", 16, 64, 0.768, 0),
    ("m5.8xlarge", 32, 128, 1.536, 0),
    ("m5.12xlarge", 48, 192, 2.304, 0),
    ("m5.16xlarge", 64, 256, 3.072, 0),
    ("m5.24xlarge", 96, 384, 4.608, 0),
    ("r5.large", 2, 16, 0.126, 0),
    ("r5.xlarge", 4, 32, 0.252, 0),
    ("r5.2xlarge", 8, 64, 0.504, 0),
    ("r5.4xlarge", 16, 128, 1.008, 0),
    ("r5.8xlarge", 32, 256, 2.016, 0),
    ("r5.16xlarge", 64, 512, 4.032, 0),
    ("r5.24xlarge", 96, 768, 6.048, 0),
    ("g4dn.xlarge", 4, 16, 0.526, 1),
    ("g4dn.12xlarge", 48, 192, 3.912, 4),
    ("p3.2xlarge", 8, 61, 3.06, 1),
];

/// On-demand types that also get a preemptible variant (6, for 30 types in all).
const SPOT: [&str; 6] = [
    "c5.xlarge",
    "c5.2xlarge",
    "m5.large",
    "m5.xlarge",
    "m5.2xlarge",
    "r5.xlarge",
];

/// Container images: PDHs whose size suffix drives the scratch estimate.
const IMAGES: [&str; 4] = [
    "d41d8cd98f00b204e9800998ecf8427e+1850",
    "0cc175b9c0f1b6a831c399e269772661+3104",
    "92eb5ffee6ae2fec3ad71c777531578f+622",
    "4a8a08f09d37b73795649038408b5f33+9540",
];

fn instance_type(
    name: &str,
    vcpus: i64,
    ram_gib: i64,
    price: f64,
    gpus: i64,
    preemptible: bool,
) -> InstanceType {
    let scratch = (vcpus * 16 * GIB).clamp(64 * GIB, 1024 * GIB);
    let gpu = if gpus > 0 {
        let target = if name.starts_with("p3") { "7.0" } else { "7.5" };
        GpuSpec {
            stack: "cuda".into(),
            driver_version: "12.4".into(),
            hardware_target: target.into(),
            device_count: gpus,
            vram: 16 * GIB,
        }
    } else {
        GpuSpec::default()
    };
    InstanceType {
        name: if preemptible {
            format!("{name}.preemptible")
        } else {
            name.to_string()
        },
        provider_type: name.to_string(),
        vcpus,
        ram: ram_gib * GIB,
        included_scratch: 0,
        added_scratch: scratch,
        scratch,
        price,
        preemptible,
        gpu,
        quota_group: String::new(),
    }
}

/// The 30 configured types, keyed by name.
fn catalogue() -> BTreeMap<String, InstanceType> {
    let mut types = BTreeMap::new();
    for &(name, vcpus, ram, price, gpus) in &CATALOGUE {
        let it = instance_type(name, vcpus, ram, price, gpus, false);
        types.insert(it.name.clone(), it);
        if SPOT.contains(&name) {
            let it = instance_type(name, vcpus, ram, price * 0.35, gpus, true);
            types.insert(it.name.clone(), it);
        }
    }
    assert_eq!(types.len(), 30);
    types
}

/// A random `len`-character base-36 string.
fn base36(rng: &mut Rng, len: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..len)
        .map(|_| DIGITS[rng.below(36) as usize] as char)
        .collect()
}

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[rng.below(xs.len() as u64) as usize]
}

/// RAM in whole 512 MiB steps in `[lo, hi]` GiB.
fn ram_between(rng: &mut Rng, lo: i64, hi: i64) -> i64 {
    lo * GIB + rng.below(((hi - lo) * 2 + 1) as u64) as i64 * 512 * MIB
}

/// A container shape: vCPUs, RAM, GPUs.
#[derive(Clone, Copy)]
struct Shape {
    vcpus: i64,
    ram: i64,
    gpu: bool,
    preemptible: bool,
    supervisor: bool,
}

/// A waiting container's shape: mostly small, some large, a few GPU.
fn waiting_shape(rng: &mut Rng) -> Shape {
    let r = rng.below(100);
    let mut s = if r < 3 {
        Shape {
            vcpus: 1,
            ram: ram_between(rng, 2, 4),
            gpu: false,
            preemptible: false,
            supervisor: true,
        }
    } else if r < 70 {
        Shape {
            vcpus: 1 + rng.below(4) as i64,
            ram: ram_between(rng, 2, 16),
            gpu: false,
            preemptible: false,
            supervisor: false,
        }
    } else if r < 90 {
        Shape {
            vcpus: pick(rng, &[8, 16]),
            ram: ram_between(rng, 16, 64),
            gpu: false,
            preemptible: false,
            supervisor: false,
        }
    } else if r < 97 {
        Shape {
            vcpus: pick(rng, &[32, 48, 64]),
            ram: ram_between(rng, 64, 512),
            gpu: false,
            preemptible: false,
            supervisor: false,
        }
    } else {
        Shape {
            vcpus: 2 + rng.below(3) as i64,
            ram: ram_between(rng, 4, 10),
            gpu: true,
            preemptible: false,
            supervisor: false,
        }
    };
    s.preemptible = !s.gpu && !s.supervisor && rng.below(6) == 0;
    s
}

fn container(
    rng: &mut Rng,
    uuid: String,
    shape: Shape,
    state: ContainerState,
    priority: i64,
) -> Container {
    let mut c = Container {
        uuid: uuid.into(),
        state,
        priority,
        container_image: pick(rng, &IMAGES).to_string(),
        created_at: Timestamp(NOW.0 - rng.below(3_600_000)),
        ..Container::default()
    };
    let rc = &mut c.runtime_constraints;
    rc.vcpus = shape.vcpus;
    rc.ram = shape.ram;
    rc.keep_cache_disk = pick(rng, &[0, GIB, 2 * GIB, 4 * GIB]);
    if shape.gpu {
        rc.gpu = GpuRequest {
            stack: "cuda".into(),
            device_count: 1,
            driver_version: "11.0".into(),
            hardware_target: vec!["7.0".into()],
            vram: 8 * GIB,
        };
    }
    c.scheduling_parameters.preemptible = shape.preemptible;
    c.scheduling_parameters.supervisor = shape.supervisor;
    if state != ContainerState::Queued {
        c.locked_by_uuid = Some(DISPATCHER_TOKEN.into());
    }
    let tmp = if shape.vcpus >= 32 {
        64 + rng.below(192)
    } else {
        1 + rng.below(32)
    } as i64
        * GIB;
    c.mounts = Some(BTreeMap::from([
        (
            "/tmp".to_string(),
            Mount {
                kind: "tmp".into(),
                capacity: tmp,
            },
        ),
        (
            "/keep".to_string(),
            Mount {
                kind: "collection".into(),
                capacity: 0,
            },
        ),
    ]));
    c
}

/// Everything a snapshot borrows.
struct World {
    table: TypeTable,
    queue: BTreeMap<Key, QueueEntry>,
    running: BTreeMap<Key, Option<Timestamp>>,
    instances: Vec<InstanceView>,
    pool: PoolLimits,
    total_instances: usize,
}

impl World {
    fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            types: &self.table,
            queue: &self.queue,
            running: &self.running,
            indexed: None,
            instances: &self.instances,
            total_instances: self.total_instances,
            pool: self.pool.clone(),
            state: SchedState::initial(0, 0),
            last_503: Timestamp::ZERO,
            max_running_per_instance: 0,
            supervisor_fraction: 0.5,
        }
    }
}

struct Builder {
    rng: Rng,
    cfg: ContainersConfig,
    table: TypeTable,
    queue: BTreeMap<Key, QueueEntry>,
}

impl Builder {
    fn fresh_uuid(&mut self) -> String {
        loop {
            let u = format!("zzzzz-dz642-{}", base36(&mut self.rng, 15));
            if !self.queue.contains_key(u.as_str()) {
                return u;
            }
        }
    }

    /// Adds `c` to the queue as the dispatcher would (resources and eligible types computed
    /// at first sight, mounts dropped). `false` when no type fits.
    fn admit(&mut self, mut c: Container, first_seen_at: Timestamp) -> bool {
        let resources = resources_needed(&self.cfg, &c);
        let types = match choose_instance_types(&self.table, &self.cfg, &c) {
            Ok(t) => t,
            Err(_) => return false,
        };
        c.mounts = None;
        self.queue.insert(
            Key::new(&c.uuid),
            QueueEntry::new(c.into(), resources, types, first_seen_at),
        );
        true
    }
}

/// A deterministic cluster with `n` queue entries and `m` instances.
fn world(n: usize, m: usize) -> World {
    let types = catalogue();
    let table = TypeTable::new(&types);
    let mut b = Builder {
        rng: Rng::derive(SEED, &format!("{n}x{m}")),
        cfg: ContainersConfig::default(),
        table,
        queue: BTreeMap::new(),
    };
    // Small types are created more often: weight 64 / vCPUs, GPU types weight 2.
    let weights: Vec<(String, f64)> = types
        .values()
        .map(|it| {
            let w = if it.gpu.device_count > 0 {
                2.0
            } else {
                64.0 / it.vcpus as f64
            };
            (it.name.clone(), w)
        })
        .collect();
    let wsum: f64 = weights.iter().map(|(_, w)| w).sum();

    let mut running: BTreeMap<Key, Option<Timestamp>> = BTreeMap::new();
    let mut instances = Vec::with_capacity(m);
    let running_budget = n / 2;
    let mut creating = 0usize;
    for _ in 0..m {
        let mut x = b.rng.unit_f64() * wsum;
        let mut name = weights[weights.len() - 1].0.as_str();
        for (tn, w) in &weights {
            if x < *w {
                name = tn;
                break;
            }
            x -= w;
        }
        let it = types[name].clone();
        let roll = b.rng.below(100);
        let mut state = match roll {
            0..55 => WorkerState::Running,
            55..75 => WorkerState::Idle,
            75..90 => WorkerState::Booting,
            90..94 => WorkerState::Unknown,
            94..97 => WorkerState::Shutdown,
            _ => pick(&mut b.rng, &[WorkerState::Idle, WorkerState::Running]),
        };
        let behavior = if roll >= 97 {
            pick(
                &mut b.rng,
                &[IdleBehavior::Hold, IdleBehavior::Hold, IdleBehavior::Drain],
            )
        } else {
            IdleBehavior::Run
        };
        let mut uuids: Vec<String> = Vec::new();
        if matches!(state, WorkerState::Running) {
            // Fill with containers that fit, up to a target count.
            let target = 1 + b.rng.below((it.vcpus as u64 / 2).clamp(1, 8)) as usize;
            let mut room = it.capacity();
            for k in 0..target {
                if running.len() >= running_budget {
                    break;
                }
                let max_v = it.vcpus.min(if k == 0 { 16 } else { 4 });
                let vcpus = 1 + b.rng.below(max_v as u64) as i64;
                let ram = ram_between(
                    &mut b.rng,
                    1,
                    (it.ram / GIB / it.vcpus * vcpus).clamp(1, 64),
                );
                let shape = Shape {
                    vcpus,
                    ram,
                    gpu: k == 0 && it.gpu.device_count > 0,
                    preemptible: it.preemptible,
                    supervisor: b.rng.below(50) == 0,
                };
                let cstate = if b.rng.below(10) == 0 {
                    ContainerState::Locked
                } else {
                    ContainerState::Running
                };
                let priority = 1 + b.rng.below(1000) as i64;
                let uuid = b.fresh_uuid();
                let c = container(&mut b.rng, uuid.clone(), shape, cstate, priority);
                let need = resources_needed(&b.cfg, &c);
                if !room.accommodates(&need) {
                    break;
                }
                let seen = Timestamp(c.created_at.0 + b.rng.below(1000));
                if !b.admit(c, seen) {
                    break;
                }
                room.sub(&need);
                // A few crunch-runs have exited and wait for the next sync.
                let exited = (b.rng.below(50) == 0).then(|| Timestamp(NOW.0 - b.rng.below(10_000)));
                running.insert(Key::new(&uuid), exited);
                uuids.push(uuid);
            }
            if uuids.is_empty() {
                state = WorkerState::Idle;
            }
        }
        uuids.sort();
        // A few booting instances are creates still in flight.
        let pending_create = state == WorkerState::Booting && b.rng.below(20) == 0;
        if pending_create {
            creating += 1;
        }
        instances.push(InstanceView {
            instance: if pending_create {
                String::new()
            } else {
                format!("i-{}", &b.rng.hex(9)[..17])
            },
            address: if pending_create {
                String::new()
            } else {
                format!(
                    "10.{}.{}.{}",
                    b.rng.below(256),
                    b.rng.below(256),
                    1 + b.rng.below(254)
                )
            },
            price: it.price,
            arvados_instance_type: it.name.clone(),
            provider_instance_type: it.provider_type.clone(),
            last_container_uuid: uuids.first().cloned().unwrap_or_default(),
            last_busy: Timestamp(NOW.0 - b.rng.below(60_000)),
            running_container_uuids: (!pending_create).then_some(uuids),
            worker_state: state,
            idle_behavior: behavior,
        });
    }

    // The rest of the queue: containers waiting for an instance.
    while b.queue.len() < n {
        let shape = waiting_shape(&mut b.rng);
        let state = if b.rng.below(100) < 85 {
            ContainerState::Queued
        } else {
            ContainerState::Locked
        };
        let priority = if b.rng.below(50) == 0 {
            0
        } else {
            1 + b.rng.below(1000) as i64
        };
        let uuid = b.fresh_uuid();
        let c = container(&mut b.rng, uuid, shape, state, priority);
        let seen = Timestamp(c.created_at.0 + b.rng.below(30_000));
        // An unsatisfiable container would have been cancelled at first sight: draw again.
        b.admit(c, seen);
    }

    World {
        pool: PoolLimits {
            quota_error: false,
            max_instances: 0,
            instance_count: m,
            creating,
            max_concurrent_creates: 0,
            create_blocked: false,
            capacity_blocked: BTreeSet::new(),
        },
        total_instances: m - creating,
        table: b.table,
        queue: b.queue,
        running,
        instances,
    }
}

/// One line about the case and what the pass decides (printed once, before measuring).
fn describe(label: &str, w: &World) {
    let snap = w.snapshot();
    let p = plan(&snap, NOW);
    let count = |f: fn(&Action) -> bool| p.actions.iter().filter(|a| f(a)).count();
    let waiting = w.queue.len() - w.running.len();
    eprintln!(
        "plan/{label}: {} running + {waiting} waiting containers, {} instances; \
         plan: {} lock, {} start, {} create, {} unlock, {} shutdown",
        w.running.len(),
        w.instances.len(),
        count(|a| matches!(a, Action::Lock(_))),
        count(|a| matches!(a, Action::Start { .. })),
        count(|a| matches!(a, Action::Create { .. })),
        count(|a| matches!(a, Action::Unlock(_))),
        count(|a| matches!(a, Action::Shutdown(_))),
    );
}

fn bench_plan(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan");
    for n in CONTAINERS {
        for m in INSTANCES {
            let label = format!("{n}x{m}");
            let w = world(n, m);
            describe(&label, &w);
            let snap = w.snapshot();
            if n >= 100_000 || (n >= 10_000 && m >= 10_000) {
                group.sample_size(10);
                group.measurement_time(Duration::from_secs(5));
            } else {
                group.sample_size(30);
                group.measurement_time(Duration::from_secs(3));
            }
            group.bench_with_input(BenchmarkId::from_parameter(&label), &snap, |bench, snap| {
                bench.iter(|| plan(black_box(snap), black_box(NOW)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
