//! The simulated Arvados controller: the container table and the server-side rules the
//! dispatcher depends on (reference-scheduler.md §4.7): lock needs Queued and priority > 0 and
//! counts `lock_count`; unlock past `MaxDispatchAttempts` cancels; a user cancel drops the
//! priority to 0 (a Queued container is then cancelled by the server); crunch-run moves Locked
//! to Running and Running to Complete. 503 windows answer every call with 503.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;

use arvados_dispatch_cloud::core::command::{ApiError, ContainerUpdate, PollResult, Tracked};
use arvados_dispatch_cloud::core::key::Key;
use arvados_dispatch_cloud::core::types::{Container, ContainerState};

use crate::scenario::Window;

/// The dispatcher's token UUID (`locked_by_uuid`).
pub const DISPATCHER_TOKEN_UUID: &str = "zzzzz-gj3su-dispatchersimul0";

/// Go's `queuedContainersTarget` and page size.
const AVAIL_PAGE: usize = 1000;
const AVAIL_TARGET: usize = 100;

/// One row of the container table, with the simulator's bookkeeping.
#[derive(Clone, Debug)]
pub struct Row {
    /// The record, without mounts, shared with the poll results that returned it: the
    /// dispatcher's queue skips a record it already holds. Changes copy it (`Arc::make_mut`)
    /// when the dispatcher still holds the old one.
    pub c: Arc<Container>,
    /// Locks so far.
    pub lock_count: i64,
    /// When crunch-run reported Running.
    pub running_at: Option<u64>,
    /// When it ended.
    pub ended_at: Option<u64>,
    /// Why it was cancelled.
    pub cancel_reason: Option<String>,
}

/// The controller.
#[derive(Debug)]
pub struct Controller {
    /// The table, by UUID (kept in the nodes, see [`Key`]).
    pub rows: BTreeMap<Key, Row>,
    /// Queued with priority > 0, by descending priority then UUID, with the current record
    /// (so that a poll reads the records without a lookup per UUID).
    /// Each with whether it is a workflow supervisor, so that a poll's paging reads no record.
    queued: BTreeMap<(Reverse<i64>, Key), (Arc<Container>, bool)>,
    /// Locked by the dispatcher (Locked or Running), with the current record.
    mine: BTreeMap<Key, Arc<Container>>,
    max_dispatch_attempts: i64,
    outages: Vec<Window>,
    /// Calls answered with 503.
    pub count_503: u64,
    /// Containers not yet ended.
    pub open: usize,
}

fn err(status: u16, message: String) -> ApiError {
    ApiError {
        status: Some(status),
        message,
    }
}

impl Controller {
    /// An empty table.
    pub fn new(max_dispatch_attempts: i64, outages: Vec<Window>) -> Controller {
        Controller {
            rows: BTreeMap::new(),
            queued: BTreeMap::new(),
            mine: BTreeMap::new(),
            max_dispatch_attempts,
            outages,
            count_503: 0,
            open: 0,
        }
    }

    /// Drops the row's index entries (taken before a change, so that the row's record is
    /// shared only with the dispatcher and `Arc::make_mut` copies it only when it must).
    fn unindex(&mut self, uuid: &Key, before: Option<(ContainerState, i64, bool)>) {
        if let Some((s, p, _)) = before
            && s == ContainerState::Queued
        {
            self.queued.remove(&(Reverse(p), uuid.clone()));
        }
        self.mine.remove(uuid);
    }

    /// Adds the row's index entries from its current record.
    fn index(&mut self, uuid: &Key) {
        let row = &self.rows[uuid];
        if row.c.state == ContainerState::Queued && row.c.priority > 0 {
            self.queued.insert(
                (Reverse(row.c.priority), row.c.uuid.clone()),
                (Arc::clone(&row.c), row.c.scheduling_parameters.supervisor),
            );
        }
        if row.c.locked_by_uuid.is_some() {
            self.mine.insert(row.c.uuid.clone(), Arc::clone(&row.c));
        }
    }

    fn reindex(&mut self, uuid: &Key, before: Option<(ContainerState, i64, bool)>) {
        self.unindex(uuid, before);
        self.index(uuid);
    }

    fn snapshot(&self, uuid: &Key) -> Option<(ContainerState, i64, bool)> {
        self.rows
            .get(uuid)
            .map(|r| (r.c.state, r.c.priority, r.c.locked_by_uuid.is_some()))
    }

    /// Adds a new Queued container.
    pub fn submit(&mut self, now: u64, mut c: Container) {
        c.state = ContainerState::Queued;
        c.created_at = arvados_dispatch_cloud::core::Timestamp(now);
        c.locked_by_uuid = None;
        c.mounts = None;
        let uuid = c.uuid.clone();
        self.rows.insert(
            uuid.clone(),
            Row {
                c: Arc::new(c),
                lock_count: 0,
                running_at: None,
                ended_at: None,
                cancel_reason: None,
            },
        );
        self.open += 1;
        self.reindex(&uuid, None);
    }

    /// Changes a container's state (crunch-run or server rules). Returns false for a transition
    /// the server refuses.
    pub fn set_state(&mut self, now: u64, uuid: &Key, to: ContainerState, reason: &str) -> bool {
        let Some(before) = self.snapshot(uuid) else {
            return false;
        };
        let from = before.0;
        use ContainerState::*;
        let ok = matches!(
            (from, to),
            (Queued, Locked)
                | (Queued, Cancelled)
                | (Locked, Queued)
                | (Locked, Running)
                | (Locked, Cancelled)
                | (Running, Complete)
                | (Running, Cancelled)
        );
        if !ok {
            return false;
        }
        self.unindex(uuid, Some(before));
        let row = self.rows.get_mut(uuid).expect("exists");
        let c = Arc::make_mut(&mut row.c);
        c.state = to;
        match to {
            Locked => c.locked_by_uuid = Some(DISPATCHER_TOKEN_UUID.into()),
            Queued | Complete | Cancelled => c.locked_by_uuid = None,
            Running => {
                row.running_at = Some(now);
            }
        }
        if to.is_final() {
            row.ended_at = Some(now);
            if to == Cancelled {
                row.cancel_reason = Some(reason.to_string());
            }
            self.open -= 1;
        }
        self.index(uuid);
        true
    }

    /// The user cancels: priority 0; a Queued container is cancelled by the server at once.
    pub fn user_cancel(&mut self, now: u64, uuid: &Key) {
        let Some(before) = self.snapshot(uuid) else {
            return;
        };
        if before.0.is_final() {
            return;
        }
        self.unindex(uuid, Some(before));
        Arc::make_mut(&mut self.rows.get_mut(uuid).expect("exists").c).priority = 0;
        self.index(uuid);
        if before.0 == ContainerState::Queued {
            self.set_state(now, uuid, ContainerState::Cancelled, "cancelled by user");
        }
    }

    fn outage(&mut self, now: u64) -> Option<ApiError> {
        if self.outages.iter().any(|w| w.contains(now)) {
            self.count_503 += 1;
            return Some(err(503, "503 Service Unavailable".into()));
        }
        None
    }

    fn update(&self, uuid: &Key) -> ContainerUpdate {
        let r = &self.rows[uuid];
        ContainerUpdate {
            state: r.c.state,
            priority: r.c.priority,
            locked_by_uuid: r.c.locked_by_uuid.clone(),
        }
    }

    /// One poll (reference-scheduler.md §4.2): "avail" pages by priority until 100 non-supervisor
    /// containers, "mine", then the missing re-fetch, and mounts for new containers.
    /// `tracked` is the dispatcher's queue (see `CommandKind::PollQueue`). Also returns, when
    /// the poll got that far, how many tracked containers are unfinished
    /// (`poll_missing(tracked).count()`, which the event log prints), counted as it goes.
    pub fn poll(
        &mut self,
        now: u64,
        tracked: &[Tracked],
    ) -> (Result<PollResult, ApiError>, Option<usize>) {
        if let Some(e) = self.outage(now) {
            return (Err(e), None);
        }
        let mut res = PollResult::default();
        let mut non_supervisors = 0usize;
        let mut page = 0usize;
        // "avail", in the server's order (priority first), with the UUIDs the map holds.
        let mut avail: Vec<(&Key, &Arc<Container>)> = Vec::new();
        for ((_, uuid), (c, supervisor)) in &self.queued {
            if page == AVAIL_PAGE {
                if non_supervisors >= AVAIL_TARGET {
                    break;
                }
                page = 0;
            }
            page += 1;
            if !supervisor {
                non_supervisors += 1;
            }
            debug_assert_eq!(*uuid, c.uuid);
            avail.push((uuid, c));
        }
        // Both lists in UUID order, merged by the maps' keys (without reading a record):
        // the queue then need not sort them. "mine" (locked by the dispatcher) never overlaps
        // "avail" (Queued, so not locked). With equal priorities "avail" is in UUID order
        // already.
        if !avail.is_sorted_by(|a, b| a.0 < b.0) {
            avail.sort_unstable_by(|a, b| a.0.cmp(b.0));
        }
        res.containers.reserve(avail.len() + self.mine.len());
        // The returned records' UUIDs, as the maps hold them, in the same order.
        let mut keys: Vec<&Key> = Vec::with_capacity(avail.len() + self.mine.len());
        let mut mine = self.mine.iter().peekable();
        for (uuid, c) in avail {
            while let Some((m, r)) = mine.next_if(|(m, _)| *m < uuid) {
                keys.push(m);
                res.containers.push(Arc::clone(r));
            }
            debug_assert!(mine.peek().is_none_or(|(m, _)| *m != uuid));
            keys.push(uuid);
            res.containers.push(Arc::clone(c));
        }
        for (m, r) in mine {
            keys.push(m);
            res.containers.push(Arc::clone(r));
        }
        // `tracked` is the core's queue, in UUID order (`CommandKind::PollQueue`'s contract).
        debug_assert!(
            tracked.windows(2).all(|w| w[0].uuid < w[1].uuid),
            "PollQueue's tracked containers come in UUID order"
        );
        // Which returned records are new to the dispatcher (they carry mounts), and which
        // unfinished tracked containers neither list returned (the missing re-fetch, in
        // `tracked` order; re-fetched records are tracked, so they never carry mounts): one
        // merge of the two UUID-ordered lists, by the UUIDs the maps and `tracked` hold.
        let mut known = vec![false; res.containers.len()];
        let mut refetch: Vec<&Key> = Vec::new();
        let mut unfinished = 0usize;
        let mut at = 0usize;
        for t in tracked {
            while at < keys.len() && *keys[at] < t.uuid {
                at += 1;
            }
            let unfinished_here = !t.state.is_final();
            unfinished += usize::from(unfinished_here);
            if at < keys.len() && *keys[at] == t.uuid {
                known[at] = true;
                at += 1;
            } else if unfinished_here {
                refetch.push(&t.uuid);
            }
        }
        for (i, known) in known.into_iter().enumerate() {
            if !known {
                Arc::make_mut(&mut res.containers[i]).mounts = Some(BTreeMap::new());
            }
        }
        // Each re-fetched record goes where its UUID keeps the list in order (a few a poll:
        // a search each).
        for uuid in refetch {
            match self.rows.get(uuid) {
                Some(r) => {
                    let at = res.containers.partition_point(|c| c.uuid < *uuid);
                    res.containers.insert(at, Arc::clone(&r.c));
                }
                None => res.deleted.push(uuid.to_string()),
            }
        }
        res.in_uuid_order = true;
        debug_assert_eq!(
            unfinished,
            arvados_dispatch_cloud::core::command::poll_missing(tracked).count()
        );
        (Ok(res), Some(unfinished))
    }

    /// `POST …/lock`.
    pub fn lock(&mut self, now: u64, uuid: &Key) -> Result<ContainerUpdate, ApiError> {
        if let Some(e) = self.outage(now) {
            return Err(e);
        }
        let Some(r) = self.rows.get(uuid) else {
            return Err(err(404, "not found".into()));
        };
        if r.c.state != ContainerState::Queued {
            return Err(err(422, format!("cannot lock when {}", r.c.state)));
        }
        if r.c.priority <= 0 {
            return Err(err(422, "cannot lock when priority<=0".into()));
        }
        self.set_state(now, uuid, ContainerState::Locked, "");
        self.rows.get_mut(uuid).expect("exists").lock_count += 1;
        Ok(self.update(uuid))
    }

    /// `POST …/unlock`: past MaxDispatchAttempts the container is cancelled instead.
    pub fn unlock(&mut self, now: u64, uuid: &Key) -> Result<ContainerUpdate, ApiError> {
        if let Some(e) = self.outage(now) {
            return Err(e);
        }
        let Some(r) = self.rows.get(uuid) else {
            return Err(err(404, "not found".into()));
        };
        if r.c.state != ContainerState::Locked {
            return Err(err(422, format!("cannot unlock when {}", r.c.state)));
        }
        if r.lock_count >= self.max_dispatch_attempts {
            let reason = format!(
                "Failed to start container.  Cancelled after exceeding 'Containers.MaxDispatchAttempts' (lock_count={})",
                r.lock_count
            );
            self.set_state(now, uuid, ContainerState::Cancelled, &reason);
        } else {
            self.set_state(now, uuid, ContainerState::Queued, "");
        }
        Ok(self.update(uuid))
    }

    /// `PUT …` state=Cancelled by the dispatcher.
    pub fn cancel(&mut self, now: u64, uuid: &Key) -> Result<ContainerUpdate, ApiError> {
        if let Some(e) = self.outage(now) {
            return Err(e);
        }
        if !self.rows.contains_key(uuid) {
            return Err(err(404, "not found".into()));
        }
        let state = self.rows[uuid].c.state;
        if !state.is_final() {
            self.set_state(
                now,
                uuid,
                ContainerState::Cancelled,
                "cancelled by dispatcher",
            );
        }
        Ok(self.update(uuid))
    }

    /// Lock if needed, record the error, cancel.
    pub fn cancel_unsatisfiable(
        &mut self,
        now: u64,
        uuid: &Key,
        message: &str,
    ) -> Result<(), ApiError> {
        if let Some(e) = self.outage(now) {
            return Err(e);
        }
        if self.rows.get(uuid).is_some_and(|r| !r.c.state.is_final()) {
            self.set_state(now, uuid, ContainerState::Cancelled, message);
        }
        Ok(())
    }
}
