//! The table of operations in flight: id assignment, deadlines, exactly-one completion.
//!
//! Every command the core emits is recorded here with what it was for and when it must end.
//! A completion is accepted once: `take` removes the record, so a duplicate or late completion
//! finds nothing and is ignored. If no completion arrives by the deadline plus a grace period,
//! the core gives up on the operation itself (`expired`) and treats it as failed with a timeout.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::command::{Command, CommandKind, ExecPurpose, OpId};
use super::time::Timestamp;

/// Extra time after a command's deadline before the core stops waiting for the adapter's own
/// timeout report.
pub const DEADLINE_GRACE: Duration = Duration::from_secs(5);

/// Most operations in flight at once; reaching it is a bug in a limit elsewhere.
pub const OPS_IN_FLIGHT_MAX: usize = 1_000_000;

/// What an operation was for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    /// Queue poll.
    Poll,
    /// Lock of a container.
    Lock(String),
    /// Unlock of a container.
    Unlock(String),
    /// Cancel of a container.
    Cancel(String),
    /// Cancel-as-unsatisfiable of a container.
    CancelUnsatisfiable(String),
    /// Create with this instance secret.
    Create(String),
    /// Destroy of an instance.
    Destroy(String),
    /// List; `threshold` is the pool's stamp when it was issued.
    List {
        /// Workers not seen since this stamp disappear.
        threshold: u64,
    },
    /// SetTags of an instance.
    SetTags(String),
    /// A remote command on an instance.
    Exec(String, ExecPurpose),
}

#[derive(Debug)]
struct Record {
    pending: Pending,
    issued: Timestamp,
    deadline: Timestamp,
}

/// Operations in flight and the outbox of commands not yet collected.
#[derive(Debug, Default)]
pub struct Ops {
    next: u64,
    records: BTreeMap<OpId, Record>,
    deadlines: BTreeSet<(Timestamp, OpId)>,
    outbox: VecDeque<Command>,
}

impl Ops {
    /// Assigns an id, records the operation and queues its command.
    pub fn issue(
        &mut self,
        now: Timestamp,
        timeout: Duration,
        pending: Pending,
        kind: CommandKind,
    ) -> OpId {
        assert!(
            self.records.len() < OPS_IN_FLIGHT_MAX,
            "too many operations in flight"
        );
        self.next += 1;
        let op = OpId(self.next);
        let deadline = now + timeout;
        self.records.insert(
            op,
            Record {
                pending,
                issued: now,
                deadline,
            },
        );
        self.deadlines.insert((deadline + DEADLINE_GRACE, op));
        self.outbox.push_back(Command { op, deadline, kind });
        op
    }

    /// Accepts the completion of `op`: returns what it was for and when it was issued, or
    /// `None` for an unknown, duplicate or expired id.
    pub fn take(&mut self, op: OpId) -> Option<(Pending, Timestamp)> {
        let rec = self.records.remove(&op)?;
        self.deadlines.remove(&(rec.deadline + DEADLINE_GRACE, op));
        Some((rec.pending, rec.issued))
    }

    /// Removes and returns the operations whose deadline (plus grace) has passed.
    pub fn expired(&mut self, now: Timestamp) -> Vec<(OpId, Pending, Timestamp)> {
        let mut out = Vec::new();
        while let Some(&(t, op)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(rec) = self.records.remove(&op) {
                out.push((op, rec.pending, rec.issued));
            }
        }
        out
    }

    /// The next command to hand out.
    pub fn pop_command(&mut self) -> Option<Command> {
        self.outbox.pop_front()
    }

    /// When the earliest deadline expires.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Operations in flight.
    pub fn in_flight(&self) -> usize {
        self.records.len()
    }

    /// Whether `op` is in flight.
    pub fn contains(&self, op: OpId) -> bool {
        self.records.contains_key(&op)
    }
}
