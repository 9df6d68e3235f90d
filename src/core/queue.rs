//! The container queue: the dispatcher's cache of the containers it cares about.
//!
//! It holds Queued containers with priority > 0 and containers locked by this dispatcher
//! (reference-scheduler.md §4). Resources and eligible types are computed once, at first sight.
//! The out-of-order guard (`dontupdate`) makes sure a poll that started before a local
//! lock/unlock/cancel never overwrites the newer state that call returned. `updated` is the
//! *start* time of the last successful poll; the sync rules compare it with crunch-run exit
//! times.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::command::{ContainerUpdate, PollResult, Tracked};
use super::config::ContainersConfig;
use super::key::Key;
use super::select::{SelectError, TypeId, TypeTable, choose_instance_types, resources_needed};
use super::snapshot::History;
use super::time::Timestamp;
use super::types::{Container, ContainerState, Resources};

/// One cached container (`QueueEnt`).
#[derive(Clone, Debug, PartialEq)]
pub struct QueueEntry {
    /// The partial record; `mounts` is always `None` once cached. Shared with the poll
    /// result it came from; local changes copy it first (`Arc::make_mut`). Private, so that
    /// [`QueueEntry::state`] and its siblings stay its copies.
    container: Arc<Container>,
    /// Needs, computed at first sight (with the mounts).
    pub resources: Resources,
    /// Eligible types, cheapest first. Empty only for a Running container whose type selection
    /// failed (reference-scheduler.md §9 B1).
    pub types: Vec<TypeId>,
    /// When this dispatcher first saw it.
    pub first_seen_at: Timestamp,
    hot: Hot,
}

/// What the scheduling pass, `sync` and the gauges read of the record, copied into the
/// entry: each of them walks the whole queue, and the records are separate heap blocks (a
/// cache miss each), while the entries sit together in the map's nodes.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Hot {
    state: ContainerState,
    priority: i64,
    supervisor: bool,
    created_at: Timestamp,
}

impl Hot {
    fn of(c: &Container) -> Hot {
        Hot {
            state: c.state,
            priority: c.priority,
            supervisor: c.scheduling_parameters.supervisor,
            created_at: c.created_at,
        }
    }
}

impl QueueEntry {
    /// An entry for `container` (its `mounts` should already be dropped).
    pub fn new(
        container: Arc<Container>,
        resources: Resources,
        types: Vec<TypeId>,
        first_seen_at: Timestamp,
    ) -> QueueEntry {
        QueueEntry {
            hot: Hot::of(&container),
            container,
            resources,
            types,
            first_seen_at,
        }
    }

    /// The record (without `mounts`).
    #[inline]
    pub fn container(&self) -> &Arc<Container> {
        &self.container
    }

    /// Changes the record (copied first if shared), keeping the entry's copies of it current.
    pub fn modify_container(&mut self, f: impl FnOnce(&mut Container)) {
        f(Arc::make_mut(&mut self.container));
        self.hot = Hot::of(&self.container);
    }

    /// The record's state.
    #[inline]
    pub fn state(&self) -> ContainerState {
        self.hot.state
    }

    /// The record's priority.
    #[inline]
    pub fn priority(&self) -> i64 {
        self.hot.priority
    }

    /// The record's `scheduling_parameters.supervisor`.
    #[inline]
    pub fn supervisor(&self) -> bool {
        self.hot.supervisor
    }

    /// The record's `created_at`.
    #[inline]
    pub fn created_at(&self) -> Timestamp {
        self.hot.created_at
    }

    fn set_container(&mut self, container: Arc<Container>) {
        self.hot = Hot::of(&container);
        self.container = container;
    }
}

/// What applying a poll asks the dispatcher to do next.
#[derive(Debug, Default, PartialEq)]
pub struct PollEffects {
    /// Containers to cancel as unsatisfiable: (uuid, state, message).
    pub cancel_unsatisfiable: Vec<(String, ContainerState, String)>,
    /// Entries added.
    pub added: usize,
    /// Entries dropped.
    pub dropped: usize,
}

/// The cache.
#[derive(Clone, Debug, Default)]
pub struct Queue {
    entries: BTreeMap<Key, QueueEntry>,
    /// Start time of the last successful poll.
    updated: Option<Timestamp>,
    /// UUIDs changed locally since the current poll started (`None` when no poll runs).
    dontupdate: Option<BTreeSet<String>>,
    /// Start time of the poll in flight.
    poll_started: Option<Timestamp>,
    /// Recent arrivals and run times, for snapshots (`super::snapshot`).
    history: History,
}

impl Queue {
    /// The entries, by UUID.
    pub fn entries(&self) -> &BTreeMap<Key, QueueEntry> {
        &self.entries
    }

    /// One entry.
    pub fn get(&self, uuid: &str) -> Option<&QueueEntry> {
        self.entries.get(&Key::new(uuid))
    }

    /// Start time of the last successful poll (`None` before the first).
    pub fn updated(&self) -> Option<Timestamp> {
        self.updated
    }

    /// Recent arrivals and run times, as polls showed them.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Marks the start of a poll. Returns what the poll command needs: the tracked
    /// containers in UUID order (see [`CommandKind::PollQueue`](super::command::CommandKind)),
    /// read from the map's nodes only.
    pub fn begin_poll(&mut self, now: Timestamp) -> Vec<Tracked> {
        self.dontupdate = Some(BTreeSet::new());
        self.poll_started = Some(now);
        self.entries
            .iter()
            .map(|(uuid, e)| Tracked {
                uuid: uuid.clone(),
                state: e.state(),
            })
            .collect()
    }

    /// The poll failed: nothing changes (the guard set stays until the next poll starts).
    pub fn poll_failed(&mut self) {
        self.poll_started = None;
    }

    /// Applies a successful poll (§4.3, §4.4). `entries_max` bounds the cache.
    pub fn apply_poll(
        &mut self,
        now: Timestamp,
        result: PollResult,
        table: &TypeTable,
        cfg: &ContainersConfig,
        entries_max: usize,
    ) -> PollEffects {
        let mut fx = PollEffects::default();
        let dont = self.dontupdate.take().unwrap_or_default();
        let started = self.poll_started.take().unwrap_or(now);
        self.history.poll_started(started);
        for uuid in &result.deleted {
            if self.entries.remove(uuid.as_str()).is_some() {
                tracing::warn!(container = %uuid, "container disappeared from the database");
                fx.dropped += 1;
            }
        }
        let mounts_errors: BTreeMap<&str, &str> = result
            .mounts_errors
            .iter()
            .map(|(u, e)| (u.as_str(), e.as_str()))
            .collect();
        // The returned records, sorted by UUID; a UUID returned twice (by "avail" and "mine")
        // keeps the first record, which the adapter puts first for "avail". Sorting a vector
        // avoids copying every UUID into a map on every poll.
        let mut next: Vec<Arc<Container>> = result.containers;
        if result.in_uuid_order {
            debug_assert!(
                next.windows(2).all(|w| w[0].uuid < w[1].uuid),
                "records vouched for as in UUID order are"
            );
        } else {
            // Nearly sorted already ("mine" comes in UUID order): the stable sort's run
            // detection makes this about one comparison per record.
            next.sort_by(|a, b| a.uuid.cmp(&b.uuid));
            next.dedup_by(|later, first| later.uuid == first.uuid);
        }
        if !result.deleted.is_empty() {
            let deleted: BTreeSet<&str> = result.deleted.iter().map(String::as_str).collect();
            next.retain(|c| !deleted.contains(c.uuid.as_str()));
        }
        // One merge of the cached entries with the returned records, both in UUID order:
        // unchanged records (the same shared record, or equal fields) keep the cached one;
        // changed ones replace it; entries the poll did not return (cancelled, completed,
        // deleted, or taken by another dispatcher) are dropped, except those changed locally
        // since the poll began. New records, and changed ones of entries with no eligible
        // type, are handled after, still in UUID order.
        enum Later {
            Untyped(Key),
            New(Arc<Container>),
        }
        let mut later: Vec<Later> = Vec::new();
        let mut stale: Vec<Key> = Vec::new();
        let mut it = next.into_iter().peekable();
        for (uuid, ent) in self.entries.iter_mut() {
            // The record the entry holds, returned again (unchanged since the last poll): a
            // pointer comparison, without reading either UUID.
            if it.next_if(|c| Arc::ptr_eq(c, &ent.container)).is_some() {
                continue;
            }
            while let Some(c) = it.next_if(|c| c.uuid < *uuid) {
                later.push(Later::New(c));
            }
            let Some(mut ctr) = it.next_if(|c| c.uuid == *uuid) else {
                if !dont.contains(uuid.as_str()) {
                    stale.push(uuid.clone());
                }
                continue;
            };
            if Arc::ptr_eq(&ent.container, &ctr) || dont.contains(uuid.as_str()) {
                continue;
            }
            if ctr.mounts.is_some() {
                Arc::make_mut(&mut ctr).mounts = None;
            }
            if *ent.container == *ctr {
                // Keep the poll's record (equal to the cached one) so that the next poll, which
                // returns the same shared record, is recognised without comparing fields.
                ent.set_container(ctr);
                continue;
            }
            self.history.changed(now, ent, &ctr);
            ent.set_container(ctr);
            if ent.types.is_empty() {
                later.push(Later::Untyped(uuid.clone()));
            }
        }
        later.extend(it.map(Later::New));
        for uuid in stale {
            self.entries.remove(&uuid);
            fx.dropped += 1;
        }
        for item in later {
            let mut ctr = match item {
                Later::Untyped(uuid) => {
                    if let Some(msg) = self.untyped_schedulable(&uuid) {
                        fx.cancel_unsatisfiable.push(msg);
                    }
                    continue;
                }
                Later::New(ctr) => ctr,
            };
            if dont.contains(ctr.uuid.as_str()) {
                continue;
            }
            let uuid = ctr.uuid.clone();
            if let Some(err) = mounts_errors.get(uuid.as_str()) {
                tracing::warn!(container = %uuid, error = %err, "error getting mounts");
                if err.contains("json: cannot unmarshal") {
                    fx.cancel_unsatisfiable.push((
                        uuid.to_string(),
                        ctr.state,
                        format!("error getting mounts from container record: {err}"),
                    ));
                }
                continue;
            }
            if self.entries.len() >= entries_max {
                // Bounded: the container stays on the server and a later poll brings it in.
                continue;
            }
            let resources = resources_needed(cfg, &ctr);
            let types = choose_instance_types(table, cfg, &ctr);
            if ctr.mounts.is_some() {
                Arc::make_mut(&mut ctr).mounts = None;
            }
            let types = match types {
                Ok(t) => t,
                Err(err) => {
                    if matches!(ctr.state, ContainerState::Queued | ContainerState::Locked) {
                        tracing::info!(container = %uuid, error = %err,
                            "cancel container with no suitable instance type");
                        fx.cancel_unsatisfiable
                            .push((uuid.to_string(), ctr.state, message(&err)));
                        continue;
                    }
                    Vec::new()
                }
            };
            self.history
                .arrived(now, &ctr, &resources, types.first().copied());
            self.entries
                .insert(uuid, QueueEntry::new(ctr, resources, types, now));
            fx.added += 1;
        }
        self.history.prune(&self.entries);
        self.updated = Some(started);
        fx
    }

    /// A lock, unlock or cancel call succeeded (`updateWithResp`). Returns whether the entry
    /// is cached, and a cancel-as-unsatisfiable request if the update made an entry with no
    /// eligible type schedulable.
    pub fn apply_update(
        &mut self,
        uuid: &str,
        upd: &ContainerUpdate,
    ) -> (bool, Option<(String, ContainerState, String)>) {
        if let Some(d) = self.dontupdate.as_mut() {
            d.insert(uuid.to_string());
        }
        match self.entries.get_mut(&Key::new(uuid)) {
            Some(ent) => {
                ent.modify_container(|c| {
                    c.state = upd.state;
                    c.priority = upd.priority;
                    c.locked_by_uuid = upd.locked_by_uuid.clone();
                });
                (true, self.untyped_schedulable(uuid))
            }
            None => (false, None),
        }
    }

    /// A Running container whose type selection failed is cached with no types (§9 B1). If it
    /// is later seen Queued or Locked (the controller requeued it), it can never be scheduled:
    /// drop it and ask for it to be cancelled, as at first sight.
    fn untyped_schedulable(&mut self, uuid: &str) -> Option<(String, ContainerState, String)> {
        let ent = self.entries.get(&Key::new(uuid))?;
        let state = ent.state();
        if !ent.types.is_empty()
            || !matches!(state, ContainerState::Queued | ContainerState::Locked)
        {
            return None;
        }
        self.entries.remove(&Key::new(uuid));
        tracing::info!(container = %uuid, "cancel container with no suitable instance type");
        Some((
            uuid.to_string(),
            state,
            super::select::NOT_SATISFIABLE.to_string(),
        ))
    }

    /// `Forget`: drops the entry only if it is final, or Queued with priority 0.
    pub fn forget(&mut self, uuid: &str) -> bool {
        let drop = self.entries.get(&Key::new(uuid)).is_some_and(|e| {
            e.state().is_final() || (e.state() == ContainerState::Queued && e.priority() == 0)
        });
        if drop {
            self.entries.remove(&Key::new(uuid));
        }
        drop
    }
}

fn message(err: &SelectError) -> String {
    err.to_string()
}
