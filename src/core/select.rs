//! Instance-type selection: the exact arithmetic of reference-scheduler.md §5.
//!
//! `resources_needed` turns a container's constraints into the resources an instance must have
//! free; `choose_instance_types` lists the eligible types, cheapest first. RAM arithmetic is i64
//! with Go's truncating division, in Go's operation order; prices are f64 compared with `>`, so
//! the boundary cases of the Go tests come out the same.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::config::ContainersConfig;
use super::types::{Container, InstanceType, Resources};

const MIB: i64 = 1 << 20;

/// Index of an instance type in a [`TypeTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TypeId(pub u32);

/// The configured instance types, indexed. Indices follow name order and never change for the
/// life of a dispatcher.
#[derive(Clone, Debug, Default)]
pub struct TypeTable {
    types: Vec<Arc<InstanceType>>,
    by_name: BTreeMap<String, TypeId>,
}

impl TypeTable {
    /// Indexes the configured types.
    pub fn new(types: &BTreeMap<String, InstanceType>) -> TypeTable {
        let mut t = TypeTable::default();
        for (name, it) in types {
            let id = TypeId(u32::try_from(t.types.len()).expect("fewer than 2^32 instance types"));
            t.types.push(Arc::new(it.clone()));
            t.by_name.insert(name.clone(), id);
        }
        t
    }

    /// The type with this index.
    pub fn get(&self, id: TypeId) -> &Arc<InstanceType> {
        &self.types[id.0 as usize]
    }

    /// The index of the type called `name`.
    pub fn id(&self, name: &str) -> Option<TypeId> {
        self.by_name.get(name).copied()
    }

    /// Number of types.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// No types configured.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// All types in index (name) order.
    pub fn iter(&self) -> impl Iterator<Item = (TypeId, &Arc<InstanceType>)> {
        self.types
            .iter()
            .enumerate()
            .map(|(i, t)| (TypeId(i as u32), t))
    }
}

/// Why no instance type fits a container.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SelectError {
    /// `ErrInstanceTypesNotConfigured`.
    #[error("site configuration does not list any instance types")]
    NoInstanceTypes,
    /// `ConstraintsNotSatisfiableError`; the message is the Arvados one.
    #[error("{0}")]
    NotSatisfiable(String),
}

/// The message Arvados records when no type fits.
pub const NOT_SATISFIABLE: &str = "constraints not satisfiable by any configured instance type";

/// `InstanceResourcesNeeded` (§5.2).
pub fn resources_needed(cfg: &ContainersConfig, ctr: &Container) -> Resources {
    let rc = &ctr.runtime_constraints;
    let mut ram = rc
        .ram
        .wrapping_add(rc.keep_cache_ram)
        .wrapping_add(cfg.reserve_extra_ram);
    if cfg.local_keep_blob_buffers_per_vcpu > 0 {
        ram = ram.wrapping_add(220 * MIB);
        // Left to right, as Go evaluates it: bufs*vcpus*64MiB*11, then int/ 10.
        let bufs = cfg
            .local_keep_blob_buffers_per_vcpu
            .wrapping_mul(rc.vcpus)
            .wrapping_mul(64 * MIB)
            .wrapping_mul(11)
            / 10;
        ram = ram.wrapping_add(bufs);
    }
    ram = ram.wrapping_mul(100) / 95;
    Resources {
        vcpus: rc.vcpus,
        ram,
        scratch: estimate_scratch_space(ctr),
        gpus: rc.gpu.device_count,
        gpu_vram: rc.gpu.vram,
        shared_vcpu_used: false,
    }
}

/// `EstimateScratchSpace` (§5.3).
pub fn estimate_scratch_space(ctr: &Container) -> i64 {
    let tmp: i64 = ctr
        .mounts
        .iter()
        .flat_map(|m| m.values())
        .filter(|m| m.kind == "tmp")
        .fold(0i64, |acc, m| acc.wrapping_add(m.capacity));
    let img = image_size_estimate(&ctr.container_image);
    tmp.max(img)
        .wrapping_add(img)
        .wrapping_add(ctr.runtime_constraints.keep_cache_disk)
}

/// The arv-keepdocker manifest-size heuristic: `^[0-9a-f]{32}\+(\d+)$`, n >= 122.
fn image_size_estimate(pdh: &str) -> i64 {
    let Some((hash, size)) = pdh.split_once('+') else {
        return 0;
    };
    let hash_ok = hash.len() == 32 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let size_ok = !size.is_empty() && size.bytes().all(|b| b.is_ascii_digit());
    if !hash_ok || !size_ok {
        return 0;
    }
    match size.parse::<i64>() {
        Ok(n) if n >= 122 => ((n - 80) / 42).wrapping_mul(64 * MIB),
        _ => 0,
    }
}

/// Go's `strconv.ParseFloat` for version strings such as "11.0".
fn parse_version(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|v| !v.is_nan())
}

/// Whether the GPU driver and hardware of `it` satisfy the request (§5.5). Only called when
/// the container asks for at least one GPU.
fn gpu_hardware_ok(it: &InstanceType, ctr: &Container) -> bool {
    let req = &ctr.runtime_constraints.gpu;
    let (Some(have), Some(want)) = (
        parse_version(&it.gpu.driver_version),
        parse_version(&req.driver_version),
    ) else {
        return false;
    };
    if have < want {
        return false;
    }
    match req.stack.as_str() {
        "cuda" => match req.hardware_target.len() {
            0 => false,
            1 => match (
                parse_version(&it.gpu.hardware_target),
                parse_version(&req.hardware_target[0]),
            ) {
                (Some(have), Some(want)) => have >= want,
                _ => false,
            },
            _ => req.hardware_target.contains(&it.gpu.hardware_target),
        },
        "rocm" => req.hardware_target.contains(&it.gpu.hardware_target),
        _ => true,
    }
}

/// `ChooseInstanceType` (§5.4): the eligible types, cheapest first.
pub fn choose_instance_types(
    table: &TypeTable,
    cfg: &ContainersConfig,
    ctr: &Container,
) -> Result<Vec<TypeId>, SelectError> {
    if table.is_empty() {
        return Err(SelectError::NoInstanceTypes);
    }
    let rc = &ctr.runtime_constraints;
    if !matches!(rc.gpu.stack.as_str(), "" | "cuda" | "rocm") {
        return Err(SelectError::NotSatisfiable(format!(
            "Invalid GPU stack {:?}, expected to be blank or one of 'cuda' or 'rocm'",
            rc.gpu.stack
        )));
    }
    let need = resources_needed(cfg, ctr);
    let factor = cfg.maximum_price_factor.max(1.0);
    let mut max_price = 0.0f64;
    let mut accepted: Vec<TypeId> = Vec::new();
    for (id, it) in table.iter() {
        let reject = (max_price > 0.0 && it.price > max_price)
            || it.scratch < need.scratch
            || it.ram < need.ram
            || it.vcpus < need.vcpus
            || it.preemptible != ctr.scheduling_parameters.preemptible
            || it.gpu.stack != rc.gpu.stack
            || it.gpu.device_count < rc.gpu.device_count
            || it.gpu.vram < rc.gpu.vram
            || (rc.gpu.device_count > 0 && !gpu_hardware_ok(it, ctr));
        if reject {
            continue;
        }
        let limit = it.price * factor;
        if max_price == 0.0 || limit < max_price {
            max_price = limit;
        }
        accepted.push(id);
    }
    if accepted.is_empty() {
        return Err(SelectError::NotSatisfiable(NOT_SATISFIABLE.to_string()));
    }
    accepted.sort_by(|a, b| {
        let (a, b) = (table.get(*a), table.get(*b));
        a.price
            .total_cmp(&b.price)
            .then(b.ram.cmp(&a.ram))
            .then(b.vcpus.cmp(&a.vcpus))
            .then(b.scratch.cmp(&a.scratch))
            // Names are unique: the order is total.
            .then_with(|| a.name.cmp(&b.name))
    });
    if let Some(cut) = accepted
        .iter()
        .skip(1)
        .position(|id| table.get(*id).price > max_price)
    {
        accepted.truncate(cut + 1);
    }
    Ok(accepted)
}
