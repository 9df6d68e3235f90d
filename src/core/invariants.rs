//! `check_invariants()`: the core's view of its own consistency.
//!
//! Cheap enough (O(queue + instances + ops)) to run after every simulated step. Each violation
//! is described in a sentence naming the container, instance or operation involved; an empty
//! list means the state is consistent. The simulator's ground-truth checks (sim/check.rs)
//! verify the same properties against the simulated world.

use super::dispatcher::Dispatcher;
use super::key::Key;
use super::types::ContainerState;

impl Dispatcher {
    /// Returns one message per violated invariant.
    pub fn check_invariants(&self) -> Vec<String> {
        let (mut v, unique) = self.pool().check(self.ops());
        if !unique {
            self.runners_on_two_instances(&mut v);
        }
        self.check_ops_and_queue(&mut v);
        v
    }

    /// No container has runners on two instances. The runners sorted by UUID, ties in
    /// visiting order: a UUID seen before is reported against the worker that last held it,
    /// in visiting order, as a map of UUID to the last worker would (without building the
    /// map).
    fn runners_on_two_instances(&self, v: &mut Vec<String>) {
        let mut runners: Vec<(&Key, &str, usize)> = Vec::new();
        for w in self.pool().workers().values() {
            for uuid in w.running.keys().chain(w.starting.keys()) {
                runners.push((uuid, &w.id, runners.len()));
            }
        }
        // Pushed in visiting order, so the stable sort breaks ties by it.
        runners.sort_by(|a, b| a.0.cmp(b.0));
        let mut twice: Vec<(usize, String)> = runners
            .windows(2)
            .filter(|p| p[0].0 == p[1].0)
            .map(|p| {
                let ((uuid, other, _), (_, id, seq)) = (p[0], p[1]);
                (
                    seq,
                    format!("container {uuid} has runners on {other} and {id}"),
                )
            })
            .collect();
        twice.sort_unstable_by_key(|(seq, _)| *seq);
        v.extend(twice.into_iter().map(|(_, msg)| msg));
    }

    fn check_ops_and_queue(&self, v: &mut Vec<String>) {
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
            if matches!(e.state(), ContainerState::Queued | ContainerState::Locked)
                && e.types.is_empty()
            {
                v.push(format!(
                    "container {} is {} with no eligible instance type",
                    e.container().uuid,
                    e.state()
                ));
            }
        }
    }
}
