//! Fixtures shared by the core tests: the Go test suite's instance types and container UUIDs.
#![allow(dead_code)]

use std::collections::BTreeMap;

use arvados_dispatch_cloud::core::types::{Container, ContainerState, InstanceType};

pub const GIB: i64 = 1 << 30;
pub const MIB: i64 = 1 << 20;

/// `test.InstanceType(i)`: VCPUs i, RAM i×1.1 GiB, scratch i GiB, price i×0.123.
pub fn type_n(i: i64) -> InstanceType {
    InstanceType {
        name: format!("type{i}"),
        provider_type: format!("providertype{i}"),
        vcpus: i,
        ram: i * GIB * 11 / 10,
        included_scratch: i * GIB,
        added_scratch: 0,
        scratch: i * GIB,
        price: i as f64 * 0.123,
        preemptible: false,
        gpu: Default::default(),
        quota_group: String::new(),
    }
}

/// Types `typeN` for each n.
pub fn types(ns: &[i64]) -> BTreeMap<String, InstanceType> {
    ns.iter()
        .map(|n| (format!("type{n}"), type_n(*n)))
        .collect()
}

/// `test.ContainerUUID(i)`.
pub fn uuid(i: usize) -> String {
    format!("zzzzz-dz642-{i:015}")
}

/// A container with the given shape.
pub fn container(
    i: usize,
    state: ContainerState,
    priority: i64,
    vcpus: i64,
    ram: i64,
) -> Container {
    let mut c = Container {
        uuid: uuid(i).into(),
        state,
        priority,
        ..Container::default()
    };
    c.runtime_constraints.vcpus = vcpus;
    c.runtime_constraints.ram = ram;
    c
}
pub mod world;
