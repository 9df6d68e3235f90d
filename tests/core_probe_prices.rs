//! The run probe with a price history (reference-workers.md §2.3): `<runner> --list
//! --stdin-prices` with the prices, plus the added scratch volume's hourly cost, as a JSON
//! array on stdin exactly when the worker's instance has a non-empty history; the plain
//! `--list` with empty stdin otherwise. Driven through the core's pool with scripted answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arvados_dispatch_cloud::core::Timestamp;
use arvados_dispatch_cloud::core::command::{CommandKind, ExecOutput, ExecPurpose, ExecStdin};
use arvados_dispatch_cloud::core::config::Config;
use arvados_dispatch_cloud::core::ops::{Ops, Pending};
use arvados_dispatch_cloud::core::pool::remote::RunnerSpec;
use arvados_dispatch_cloud::core::pool::{ExecDone, Pool};
use arvados_dispatch_cloud::core::select::TypeTable;
use arvados_dispatch_cloud::core::types::{InstanceInfo, InstanceType, PricePoint, WorkerState};

const SET: &str = "zzzzz-gj3su-000000000000000";
const T0: Timestamp = Timestamp(1_800_000_000_000);
const GIB: i64 = 1 << 30;

fn instance_type(name: &str, added_scratch: i64, preemptible: bool) -> InstanceType {
    InstanceType {
        name: name.into(),
        provider_type: "m5.large".into(),
        vcpus: 2,
        ram: 8 * GIB,
        added_scratch,
        scratch: added_scratch,
        price: 0.1,
        preemptible,
        ..InstanceType::default()
    }
}

fn pool() -> (Pool, Ops) {
    let mut cfg = Config::default();
    for t in [
        instance_type("spot-scratch", 50 * GIB + 1, true),
        instance_type("spot", 0, true),
        instance_type("ondemand", 0, false),
    ] {
        cfg.instance_types.insert(t.name.clone(), t);
    }
    cfg.cloud_vms.timeout_booting = Duration::from_secs(600);
    cfg.cloud_vms.max_cloud_ops_per_second = 0.0;
    let table = TypeTable::new(&cfg.instance_types);
    let pool = Pool::new(
        Arc::new(cfg),
        table,
        RunnerSpec::installed("crunch-run"),
        SET,
        T0,
    );
    (pool, Ops::default())
}

/// A listed instance of configured type `type_name` with `history` and `ebs_price`.
fn info(
    id: &str,
    type_name: &str,
    user: &str,
    history: Vec<PricePoint>,
    ebs_price: f64,
) -> Arc<InstanceInfo> {
    let tags: BTreeMap<String, String> = [
        ("ArvadosInstanceSetID", SET),
        ("ArvadosInstanceType", type_name),
        ("ArvadosIdleBehavior", "run"),
        ("ArvadosInstanceSecret", "abc"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Arc::new(InstanceInfo {
        id: id.into(),
        address: "10.9.8.7".into(),
        provider_type: "m5.large".into(),
        tags,
        remote_user: user.into(),
        price_history: history,
        scratch_gib_month_price: ebs_price,
    })
}

fn point(secs: u64, price: f64) -> PricePoint {
    PricePoint {
        start_time: Timestamp(secs * 1000),
        price,
    }
}

/// Probes `id` (booting succeeds, the run probe reports nothing) and returns the run probe's
/// command line and stdin.
fn run_probe(pool: &mut Pool, ops: &mut Ops, now: Timestamp, id: &str) -> (String, ExecStdin) {
    pool.probe_now(now, ops, id);
    let mut list = None;
    while let Some(cmd) = ops.pop_command() {
        let CommandKind::Exec {
            instance,
            purpose,
            command,
            stdin,
        } = cmd.kind
        else {
            ops.take(cmd.op);
            continue;
        };
        if purpose == ExecPurpose::ListProbe {
            assert!(list.is_none(), "one run probe per probe");
            list = Some((command, stdin));
        }
        let (pending, issued) = ops.take(cmd.op).expect("in flight");
        let Pending::Exec(_, p) = pending else {
            panic!("an exec is pending as an exec")
        };
        pool.exec_finished(
            now,
            ops,
            ExecDone {
                op: cmd.op,
                issued,
                instance,
                purpose: p,
                result: Ok(ExecOutput::default()),
            },
        );
    }
    list.expect("the run probe was issued")
}

#[test]
fn prices_go_on_stdin_exactly_when_the_history_is_not_empty() {
    let (mut pool, mut ops) = pool();
    let history = vec![point(1_767_323_045, 0.0441), point(1_767_300_000, 0.05)];
    pool.listed(
        T0,
        0,
        Ok(vec![
            info(
                "i-spot-scratch",
                "spot-scratch",
                "root",
                history.clone(),
                0.1,
            ),
            info("i-spot", "spot", "admin", history.clone(), 0.1),
            info("i-ondemand", "ondemand", "root", Vec::new(), 0.1),
            info("i-spot-nohistory", "spot", "root", Vec::new(), 0.0),
        ]),
    );

    // 51 GiB of added scratch at $0.10 per GiB-month, per hour.
    let hourly = 0.1 * 51.0 / 30.0 / 24.0;
    let (cmd, stdin) = run_probe(&mut pool, &mut ops, T0, "i-spot-scratch");
    assert_eq!(cmd, "crunch-run --list --stdin-prices");
    assert_eq!(
        stdin,
        ExecStdin::Text(format!(
            "[{{\"StartTime\":\"2026-01-02T03:04:05Z\",\"Price\":{}}},\
             {{\"StartTime\":\"2026-01-01T20:40:00Z\",\"Price\":{}}}]",
            0.0441 + hourly,
            0.05 + hourly
        ))
    );
    let ExecStdin::Text(json) = &stdin else {
        unreachable!()
    };
    let parsed: serde_json::Value = serde_json::from_str(json).expect("valid JSON");
    assert_eq!(parsed.as_array().map(Vec::len), Some(2));

    // No added scratch: the prices as listed; a non-root user gets sudo.
    let (cmd, stdin) = run_probe(&mut pool, &mut ops, T0, "i-spot");
    assert_eq!(cmd, "sudo crunch-run --list --stdin-prices");
    assert_eq!(
        stdin,
        ExecStdin::Text(
            "[{\"StartTime\":\"2026-01-02T03:04:05Z\",\"Price\":0.0441},\
             {\"StartTime\":\"2026-01-01T20:40:00Z\",\"Price\":0.05}]"
                .into()
        )
    );

    // No history: the plain run probe with nothing on stdin.
    for id in ["i-ondemand", "i-spot-nohistory"] {
        let (cmd, stdin) = run_probe(&mut pool, &mut ops, T0, id);
        assert_eq!(cmd, "crunch-run --list", "{id}");
        assert_eq!(stdin, ExecStdin::Empty, "{id}");
    }
    for id in ["i-spot-scratch", "i-spot", "i-ondemand", "i-spot-nohistory"] {
        assert_eq!(pool.workers()[id].state, WorkerState::Idle, "{id}");
    }

    // A later listing without history (prices disabled) goes back to the plain probe; one
    // with a history again sends it.
    let later = T0 + Duration::from_secs(60);
    pool.listed(
        later,
        0,
        Ok(vec![
            info("i-spot-scratch", "spot-scratch", "root", Vec::new(), 0.1),
            info(
                "i-spot",
                "spot",
                "admin",
                vec![point(1_767_400_000, 0.06)],
                0.0,
            ),
            info("i-ondemand", "ondemand", "root", Vec::new(), 0.1),
            info("i-spot-nohistory", "spot", "root", Vec::new(), 0.0),
        ]),
    );
    let (cmd, stdin) = run_probe(&mut pool, &mut ops, later, "i-spot-scratch");
    assert_eq!(cmd, "crunch-run --list");
    assert_eq!(stdin, ExecStdin::Empty);
    let (cmd, stdin) = run_probe(&mut pool, &mut ops, later, "i-spot");
    assert_eq!(cmd, "sudo crunch-run --list --stdin-prices");
    assert_eq!(
        stdin,
        ExecStdin::Text("[{\"StartTime\":\"2026-01-03T00:26:40Z\",\"Price\":0.06}]".into())
    );
    assert!(pool.check_invariants(&ops).is_empty());
}
