//! Instance-type selection scenarios of reference-scheduler.md §8 (tests 24–32,
//! `node_size_test.go`) and the worked examples of §5.
#![allow(clippy::field_reassign_with_default)]

mod common;

use std::collections::BTreeMap;

use arvados_dispatch_cloud::core::config::ContainersConfig;
use arvados_dispatch_cloud::core::select::{
    NOT_SATISFIABLE, SelectError, TypeTable, choose_instance_types, estimate_scratch_space,
    resources_needed,
};
use arvados_dispatch_cloud::core::types::{Container, GpuSpec, InstanceType, Mount, Resources};
use common::*;

fn it(name: &str, vcpus: i64, ram: i64, scratch: i64, price: f64) -> InstanceType {
    InstanceType {
        name: name.into(),
        provider_type: name.into(),
        vcpus,
        ram,
        included_scratch: scratch,
        scratch,
        price,
        ..InstanceType::default()
    }
}

fn table(types: Vec<InstanceType>) -> TypeTable {
    let m: BTreeMap<String, InstanceType> =
        types.into_iter().map(|t| (t.name.clone(), t)).collect();
    TypeTable::new(&m)
}

fn chosen(
    t: &TypeTable,
    cfg: &ContainersConfig,
    c: &Container,
) -> Result<Vec<String>, SelectError> {
    choose_instance_types(t, cfg, c).map(|v| v.iter().map(|id| t.get(*id).name.clone()).collect())
}

fn tmp_mount(bytes: i64) -> Option<BTreeMap<String, Mount>> {
    Some(BTreeMap::from([(
        "/tmp".to_string(),
        Mount {
            kind: "tmp".into(),
            capacity: bytes,
        },
    )]))
}

/// The container of `TestChoose`: 2 VCPU, RAM 987654321, keep_cache_ram 123456789, 2 GiB tmp.
fn choose_container() -> Container {
    let mut c = Container::default();
    c.runtime_constraints.vcpus = 2;
    c.runtime_constraints.ram = 987654321;
    c.runtime_constraints.keep_cache_ram = 123456789;
    c.mounts = tmp_mount(2 * GIB);
    c
}

fn choose_config(bufs: i64, factor: f64) -> ContainersConfig {
    ContainersConfig {
        local_keep_blob_buffers_per_vcpu: bufs,
        reserve_extra_ram: 256 * MIB,
        maximum_price_factor: factor,
        ..ContainersConfig::default()
    }
}

#[test]
fn ram_need_matches_the_worked_examples() {
    assert_eq!(
        resources_needed(&choose_config(1, 1.0), &choose_container()).ram,
        1850392406
    );
    assert_eq!(
        resources_needed(&choose_config(16, 1.0), &choose_container()).ram,
        4181542418
    );
    let mut c = Container::default();
    c.runtime_constraints.vcpus = 2;
    c.runtime_constraints.ram = 4 * GIB;
    assert_eq!(
        resources_needed(&ContainersConfig::default(), &c).ram,
        5526326648
    );
}

#[test]
fn no_types_configured() {
    let t = table(vec![]);
    let err =
        choose_instance_types(&t, &ContainersConfig::default(), &Container::default()).unwrap_err();
    assert_eq!(err, SelectError::NoInstanceTypes);
    assert_eq!(
        err.to_string(),
        "site configuration does not list any instance types"
    );
}

#[test]
fn unsatisfiable() {
    let t = table(vec![
        it("small1", 1, GIB, 0, 1.0),
        it("small2", 2, 2 * GIB, 0, 2.0),
        it("small4", 4, 4 * GIB, GIB, 4.0),
    ]);
    let cfg = ContainersConfig::default();
    let mut cases = Vec::new();
    let mut c = Container::default();
    c.runtime_constraints.vcpus = 1;
    c.runtime_constraints.ram = 9_870_000_000;
    cases.push(c.clone());
    c.runtime_constraints.ram = 1;
    c.runtime_constraints.vcpus = 20;
    cases.push(c.clone());
    c.runtime_constraints.vcpus = 1;
    c.runtime_constraints.keep_cache_ram = 9_870_000_000;
    cases.push(c.clone());
    c.runtime_constraints.keep_cache_ram = 0;
    c.mounts = tmp_mount(2 * GIB);
    cases.push(c);
    for c in cases {
        let err = choose_instance_types(&t, &cfg, &c).unwrap_err();
        assert_eq!(
            err,
            SelectError::NotSatisfiable(NOT_SATISFIABLE.into()),
            "{c:?}"
        );
    }
}

#[test]
fn choose() {
    let menus = vec![
        vec![
            it("costly", 4, 4_000_000_000, 4 * GIB, 4.0),
            it("best", 2, 2_000_000_000, 2 * GIB, 2.0),
            it("small", 1, 1_000_000_000, 2 * GIB, 1.0),
        ],
        vec![
            it("costly", 4, 4_000_000_000, 4 * GIB, 4.0),
            it("goodenough", 2, 1_900_000_000, 2 * GIB, 2.0),
            it("best", 2, 2_000_000_000, 2 * GIB, 2.0),
            it("small", 1, 1_000_000_000, 2 * GIB, 1.0),
        ],
        vec![
            it("small", 1, 1_000_000_000, 2 * GIB, 1.0),
            it("nearly", 2, 2_000_000_000, GIB, 1.5),
            it("best", 2, 2_000_000_000, 2 * GIB, 2.0),
        ],
        vec![
            it("lowram", 2, 1_800_000_000, 2 * GIB, 1.5),
            it("best", 2, 2_000_000_000, 2 * GIB, 2.0),
            it("costly", 4, 4_000_000_000, 4 * GIB, 4.0),
        ],
        vec![it("best", 2, 2_000_000_000, 2 * GIB, 2.0)],
    ];
    let cfg = choose_config(1, 1.0);
    for menu in menus {
        let t = table(menu);
        let got = chosen(&t, &cfg, &choose_container()).expect("satisfiable");
        assert_eq!(got[0], "best", "{got:?}");
        let p0 = t.get(t.id(&got[0]).expect("named")).price;
        for name in &got {
            assert_eq!(
                t.get(t.id(name).expect("named")).price,
                p0,
                "factor 1: same price only"
            );
        }
        assert!(
            !got.iter()
                .any(|n| n == "nearly" || n == "lowram" || n == "small")
        );
    }
}

#[test]
fn maximum_price_factor() {
    let t = table(vec![
        it("small", 2, 2_000_000_000, GIB, 1.0),
        it("small+1", 2, 1_000_000_000, 2 * GIB, 1.5),
        it("best", 2, 2_000_000_000, 2 * GIB, 2.0),
        it("best+1", 2, 2_000_000_000, 2 * GIB, 2.2),
        it("best+2", 2, 2_000_000_000, 2 * GIB, 2.5),
        it("best+3", 2, 2_000_000_000, 2 * GIB, 2.8),
        it("best+4", 2, 2_000_000_000, 2 * GIB, 3.1),
        it("best+5", 2, 2_000_000_000, 2 * GIB, 3.0),
    ]);
    let got = chosen(&t, &choose_config(1, 1.5), &choose_container()).expect("ok");
    assert_eq!(got, ["best", "best+1", "best+2", "best+3", "best+5"]);
}

#[test]
fn price_factor_boundary_matches_ieee() {
    // 0.123×2×1.5 == 0.123×3, so type3 is within 1.5× of type2.
    let t = TypeTable::new(&types(&[2, 3, 4]));
    let mut c = Container::default();
    c.runtime_constraints.vcpus = 1;
    c.runtime_constraints.ram = GIB;
    let cfg = ContainersConfig {
        reserve_extra_ram: 0,
        local_keep_blob_buffers_per_vcpu: 0,
        maximum_price_factor: 1.5,
        ..ContainersConfig::default()
    };
    assert_eq!(chosen(&t, &cfg, &c).expect("ok"), ["type2", "type3"]);
}

#[test]
fn choose_with_blob_buffers_overhead() {
    let t = table(vec![
        it("nearly", 4, 4_000_000_000, 4 * GIB, 1.0),
        it("best", 8, 8_000_000_000, 4 * GIB, 2.0),
    ]);
    assert_eq!(
        chosen(&t, &choose_config(16, 1.0), &choose_container()).expect("ok"),
        ["best"]
    );
}

#[test]
fn choose_preemptible() {
    let mut best = it("best", 2, 2_000_000_000, 2 * GIB, 2.0);
    best.preemptible = true;
    let mut cheaper = it("cheaper", 2, 2_000_000_000, 2 * GIB, 1.0);
    cheaper.preemptible = false;
    let same = it("same", 2, 2_000_000_000, 2 * GIB, 2.0);
    let t = table(vec![best, cheaper, same]);
    let mut c = choose_container();
    c.scheduling_parameters.preemptible = true;
    assert_eq!(
        chosen(&t, &choose_config(1, 1.0), &c).expect("ok"),
        ["best"]
    );
}

#[test]
fn scratch_for_docker_image() {
    let mut c = Container::default();
    c.container_image = "d41d8cd98f00b204e9800998ecf8427e+342".into();
    assert_eq!(estimate_scratch_space(&c), 805306368);
    c.container_image = "d41d8cd98f00b204e9800998ecf8427e+-342".into();
    assert_eq!(estimate_scratch_space(&c), 0);
    c.container_image = "d41d8cd98f00b204e9800998ecf8427e+34".into();
    assert_eq!(estimate_scratch_space(&c), 0);
    c.container_image = "d41d8cd98f00b204e9800998ecf8427e+342+Afoo@bar".into();
    assert_eq!(estimate_scratch_space(&c), 0);
}

fn gpu_type(
    name: &str,
    stack: &str,
    n: i64,
    target: &str,
    driver: &str,
    vram: i64,
    price: f64,
) -> InstanceType {
    let mut t = it(name, 4, 8 * GIB, 8 * GIB, price);
    t.gpu = GpuSpec {
        stack: stack.into(),
        driver_version: driver.into(),
        hardware_target: target.into(),
        device_count: n,
        vram,
    };
    t
}

#[test]
fn choose_gpu() {
    let t = table(vec![
        gpu_type("costly", "cuda", 2, "9.0", "11.0", 2_000_000_000, 4.0),
        gpu_type(
            "low_capability",
            "cuda",
            1,
            "8.0",
            "11.0",
            2_000_000_000,
            1.5,
        ),
        gpu_type("best", "cuda", 1, "9.0", "11.0", 2_000_000_000, 2.0),
        gpu_type("low_driver", "cuda", 1, "9.0", "10.0", 2_000_000_000, 1.5),
        gpu_type("more_vram", "cuda", 1, "8.0", "10.0", 8_000_000_000, 3.0),
        gpu_type("gpu_rocm", "rocm", 1, "gfx1100", "6.2", 2_000_000_000, 2.0),
        gpu_type(
            "cheap_gpu_rocm",
            "rocm",
            1,
            "gfx1103",
            "6.2",
            2_000_000_000,
            1.5,
        ),
        gpu_type("rocm_novram", "rocm", 1, "gfx1104", "6.2", 0, 1.0),
        it("non_gpu", 4, 8 * GIB, 8 * GIB, 1.0),
    ]);
    let cfg = ContainersConfig {
        maximum_price_factor: 1.0,
        ..ContainersConfig::default()
    };
    let req = |stack: &str, n: i64, targets: &[&str], driver: &str, vram: i64| {
        let mut c = Container::default();
        c.runtime_constraints.vcpus = 1;
        c.runtime_constraints.ram = GIB;
        c.runtime_constraints.gpu.stack = stack.into();
        c.runtime_constraints.gpu.device_count = n;
        c.runtime_constraints.gpu.hardware_target = targets.iter().map(|s| s.to_string()).collect();
        c.runtime_constraints.gpu.driver_version = driver.into();
        c.runtime_constraints.gpu.vram = vram;
        chosen(&t, &cfg, &c).map(|v| v[0].clone())
    };
    assert_eq!(
        req("cuda", 1, &["9.0"], "11.0", 2_000_000_000).expect("ok"),
        "best"
    );
    assert_eq!(
        req("cuda", 2, &["9.0"], "11.0", 2_000_000_000).expect("ok"),
        "costly"
    );
    assert_eq!(
        req("cuda", 1, &["8.0"], "11.0", 2_000_000_000).expect("ok"),
        "low_capability"
    );
    assert_eq!(
        req("cuda", 1, &["9.0"], "10.0", 2_000_000_000).expect("ok"),
        "low_driver"
    );
    assert!(req("cuda", 1, &[], "10.0", 2_000_000_000).is_err());
    assert_eq!(
        req("rocm", 1, &["gfx1100"], "6.2", 2_000_000_000).expect("ok"),
        "gpu_rocm"
    );
    assert_eq!(
        req("rocm", 1, &["gfx1100", "gfx1103"], "6.2", 2_000_000_000).expect("ok"),
        "cheap_gpu_rocm"
    );
    assert!(req("rocm", 1, &["gfx1104"], "6.2", 2_000_000_000).is_err());
    assert_eq!(req("", 0, &[], "", 0).expect("ok"), "non_gpu");
    // The Go table's `more_vram` row: its driver (10.0) is older than requested (11.0).
    assert!(req("cuda", 1, &["8.0"], "11.0", 8_000_000_000).is_err());
    let bad = req("opencl", 1, &[], "1", 0).unwrap_err();
    assert_eq!(
        bad.to_string(),
        "Invalid GPU stack \"opencl\", expected to be blank or one of 'cuda' or 'rocm'"
    );
}

#[test]
fn instance_resources_truth_table() {
    let r = |vcpus: i64| Resources {
        vcpus,
        ..Resources::default()
    };
    let mut a = r(2);
    a.sub(&r(0));
    assert!(a.shared_vcpu_used, "{{2}}-{{0}} sets shared");
    let mut b = r(2);
    b.sub(&r(1));
    assert!(!b.shared_vcpu_used, "{{2}}-{{1}} does not");
    b.sub(&r(0));
    b.sub(&r(1));
    assert!(b.shared_vcpu_used, "the flag stays set");
    assert!(r(2).accommodates(&r(2)));
    let mut shared2 = r(2);
    shared2.shared_vcpu_used = true;
    assert!(!shared2.accommodates(&r(2)));
    assert!(shared2.accommodates(&r(1)));
    assert!(shared2.accommodates(&r(0)));
    let mut shared1 = r(1);
    shared1.shared_vcpu_used = true;
    assert!(!shared1.accommodates(&r(1)));
    assert!(shared1.accommodates(&r(0)));
    assert!(!r(0).accommodates(&r(0)));
}
