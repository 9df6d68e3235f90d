//! JSON shapes of the management API (reference-scheduler.md §6), built from the core's types.
//!
//! Invariants: field names, their order and `null` versus `[]` follow the Go dispatcher's JSON
//! (`SchedQueueEnt`, `arvados.Container`, `worker.InstanceView`); times are RFC 3339 in UTC with
//! Go's `RFC3339Nano` trimming of trailing zeros, and the core's "never" (time zero) is written
//! as Go's zero time, `0001-01-01T00:00:00Z`.

use serde_json::{Map, Value, json};

use crate::core::dispatcher::QueueItem;
use crate::core::select::TypeTable;
use crate::core::time::Timestamp;
use crate::core::types::{Container, InstanceView};

/// Go's zero `time.Time`, as `encoding/json` writes it.
pub const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A timestamp (milliseconds since the Unix epoch) in RFC 3339 with Go's `RFC3339Nano`
/// formatting: UTC, `Z`, and a fraction only when it is not zero, without trailing zeros.
/// [`Timestamp::ZERO`] means "never" in the core and is written as Go's zero time.
pub fn rfc3339(t: Timestamp) -> String {
    if t == Timestamp::ZERO {
        return GO_ZERO_TIME.to_string();
    }
    crate::core::price::rfc3339(t)
}

/// `worker.InstanceView` as JSON.
pub fn instance_view(v: &InstanceView) -> Value {
    json!({
        "instance": v.instance,
        "address": v.address,
        "price": v.price,
        "arvados_instance_type": v.arvados_instance_type,
        "provider_instance_type": v.provider_instance_type,
        "last_container_uuid": v.last_container_uuid,
        "last_busy": rfc3339(v.last_busy),
        "running_container_uuids": v.running_container_uuids,
        "worker_state": v.worker_state.as_str(),
        "idle_behavior": v.idle_behavior.as_str(),
    })
}

/// `{"items": [...]}` for the instance list: `null` when there are no instances, as Go's nil
/// slice encodes.
pub fn instance_list(views: &[InstanceView]) -> Value {
    if views.is_empty() {
        json!({ "items": null })
    } else {
        json!({ "items": views.iter().map(instance_view).collect::<Vec<_>>() })
    }
}

/// The full `arvados.Container` JSON, every field, as Go encodes the dispatcher's partial copy:
/// fields the dispatcher does not load are zero values (`""`, `0`, `null`, zero time).
pub fn container(c: &Container) -> Value {
    let rc = &c.runtime_constraints;
    let sp = &c.scheduling_parameters;
    json!({
        "uuid": c.uuid,
        "etag": "",
        "created_at": rfc3339(c.created_at),
        "modified_by_user_uuid": "",
        "modified_at": GO_ZERO_TIME,
        "command": null,
        "container_image": c.container_image,
        "cwd": "",
        "environment": null,
        "locked_by_uuid": c.locked_by_uuid.as_deref().unwrap_or(""),
        "lock_count": 0,
        "mounts": null,
        "output": "",
        "output_path": "",
        "priority": c.priority,
        "runtime_constraints": {
            "API": rc.api,
            "ram": rc.ram,
            "vcpus": rc.vcpus,
            "keep_cache_ram": rc.keep_cache_ram,
            "keep_cache_disk": rc.keep_cache_disk,
            "gpu": {
                "stack": rc.gpu.stack,
                "driver_version": rc.gpu.driver_version,
                "hardware_target": nil_if_empty(&rc.gpu.hardware_target),
                "device_count": rc.gpu.device_count,
                "vram": rc.gpu.vram,
            },
        },
        "state": c.state.as_str(),
        "scheduling_parameters": {
            "partitions": nil_if_empty(&sp.partitions),
            "preemptible": sp.preemptible,
            "max_run_time": sp.max_run_time,
            "supervisor": sp.supervisor,
        },
        "exit_code": 0,
        "runtime_status": null,
        "started_at": null,
        "finished_at": null,
        "gateway_address": "",
        "interactive_session_started": false,
        "output_storage_classes": null,
        "runtime_user_uuid": "",
        "runtime_auth_scopes": null,
        "runtime_token": "",
        "auth_uuid": "",
        "log": "",
        "cost": 0.0,
        "subrequests_cost": 0.0,
        "output_properties": null,
        "output_glob": null,
        "service": false,
        "published_ports": null,
    })
}

/// A list as Go's JSON would show a slice decoded from an absent field: `null` when empty.
fn nil_if_empty(v: &[String]) -> Value {
    if v.is_empty() { Value::Null } else { json!(v) }
}

/// One `SchedQueueEnt`: the container, its needs, its eligible types, when it was first seen and
/// its scheduling status.
pub fn queue_item(item: &QueueItem, types: &TypeTable) -> Value {
    let e = &item.entry;
    let its: Vec<Value> = e
        .types
        .iter()
        .map(|id| serde_json::to_value(types.get(*id).as_ref()).unwrap_or(Value::Null))
        .collect();
    let mut m = Map::new();
    m.insert("container".into(), container(e.container()));
    m.insert(
        "instance_resources".into(),
        serde_json::to_value(e.resources).unwrap_or(Value::Null),
    );
    m.insert(
        "instance_types".into(),
        if its.is_empty() {
            Value::Null
        } else {
            Value::Array(its)
        },
    );
    m.insert("first_seen_at".into(), json!(rfc3339(e.first_seen_at)));
    m.insert("scheduling_status".into(), json!(item.scheduling_status));
    Value::Object(m)
}

/// `{"items": [...]}` for the scheduler queue: `null` before the first scheduling pass.
pub fn queue_list(items: Option<&[QueueItem]>, types: &TypeTable) -> Value {
    match items {
        None => json!({ "items": null }),
        Some(items) => {
            json!({ "items": items.iter().map(|i| queue_item(i, types)).collect::<Vec<_>>() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_go() {
        assert_eq!(rfc3339(Timestamp::ZERO), "0001-01-01T00:00:00Z");
        assert_eq!(rfc3339(Timestamp(1)), "1970-01-01T00:00:00.001Z");
        assert_eq!(rfc3339(Timestamp(1_000_000)), "1970-01-01T00:16:40Z");
        // 2024-02-29T12:34:56.120Z (a leap day), with the trailing zero trimmed.
        assert_eq!(
            rfc3339(Timestamp(1_709_210_096_120)),
            "2024-02-29T12:34:56.12Z"
        );
        assert_eq!(
            rfc3339(Timestamp(1_798_761_599_999)),
            "2026-12-31T23:59:59.999Z"
        );
    }
}
