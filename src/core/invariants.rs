//! `check_invariants()`: the core's view of its own consistency.
//!
//! Cheap enough (O(queue + instances + ops)) to run after every simulated step. Each violation
//! is described in a sentence naming the container, instance or operation involved; an empty
//! list means the state is consistent. The simulator's ground-truth checks (sim/check.rs)
//! verify the same properties against the simulated world.

use std::collections::BTreeMap;

use super::dispatcher::Dispatcher;
use super::types::ContainerState;

impl Dispatcher {
    /// Returns one message per violated invariant.
    pub fn check_invariants(&self) -> Vec<String> {
        let mut v = self.pool().check_invariants(self.ops());
        // No container has runners on two instances.
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for w in self.pool().workers().values() {
            for uuid in w.running.keys().chain(w.starting.keys()) {
                if let Some(other) = seen.insert(uuid.as_str(), w.id.as_str()) {
                    v.push(format!(
                        "container {uuid} has runners on {other} and {}",
                        w.id
                    ));
                }
            }
        }
        // Per-container operations and the poll are really in flight (each op completes once).
        for (uuid, op) in self.uuid_ops() {
            if !self.ops().contains(*op) {
                v.push(format!(
                    "operation {op} for container {uuid} is not in flight"
                ));
            }
        }
        if let Some(op) = self.poll_op()
            && !self.ops().contains(op)
        {
            v.push(format!("queue poll {op} is not in flight"));
        }
        // Queued and Locked entries have eligible types.
        for e in self.queue().entries().values() {
            if matches!(
                e.container.state,
                ContainerState::Queued | ContainerState::Locked
            ) && e.types.is_empty()
            {
                v.push(format!(
                    "container {} is {} with no eligible instance type",
                    e.container.uuid, e.container.state
                ));
            }
        }
        v
    }
}
