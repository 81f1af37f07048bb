//! Per-assignee windows and their close rules (contract section 3): the reason
//! one bulk assignment becomes one WeChat notice instead of fifty.
//!
//! Pure state plus the time it is given: no clock is read here, so tests are
//! exact. A window opens with an assignee's first event and closes at the
//! earliest of the quiet period, the max wait, the max event count, or the
//! moment every CRM batch with events in it is complete. Batch progress is
//! counted across all assignees, since `batch.size` is the whole batch's size.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use tokio::time::Instant;

use crate::event::AssignmentEvent;
use crate::notice::Notice;

/// The three limits of a window.
#[derive(Debug, Clone, Copy)]
pub struct WindowRules {
    pub quiet: Duration,
    pub max_wait: Duration,
    pub max_events: usize,
}

/// Why a window closed (a metric label and a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Quiet,
    MaxWait,
    MaxEvents,
    BatchComplete,
    Shutdown,
    /// An accept released the user's held events: the open window goes with them.
    Release,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Quiet => "quiet",
            CloseReason::MaxWait => "max_wait",
            CloseReason::MaxEvents => "max_events",
            CloseReason::BatchComplete => "batch_complete",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Release => "release",
        }
    }
}

/// A closed window: its distinct events in arrival order, and every delivery
/// that carried one of them (a duplicate delivery points at the same event).
#[derive(Debug)]
pub struct Closed<D> {
    pub events: Vec<AssignmentEvent>,
    pub deliveries: Vec<(usize, D)>,
    pub reason: CloseReason,
    /// How many of the first `events` come from the grant ledger (held
    /// events, with no delivery of their own here; `NOTIFIER_MAX_AGE` does not
    /// apply to them). 0 without the ledger.
    pub held: usize,
}

impl<D> Closed<D> {
    /// Takes the events `take` marks (none of the held part) out of the
    /// window, with every delivery of theirs, as a window of their own.
    pub fn split_off(&mut self, take: &[bool]) -> Closed<D> {
        let mut out = Closed {
            events: Vec::new(),
            deliveries: Vec::new(),
            reason: self.reason,
            held: 0,
        };
        let mut index = vec![usize::MAX; take.len()];
        let mut kept = Vec::new();
        for (i, e) in std::mem::take(&mut self.events).into_iter().enumerate() {
            if take[i] {
                index[i] = out.events.len();
                out.events.push(e);
            } else {
                index[i] = kept.len();
                kept.push(e);
            }
        }
        for (i, d) in std::mem::take(&mut self.deliveries) {
            if take[i] {
                out.deliveries.push((index[i], d));
            } else {
                self.deliveries.push((index[i], d));
            }
        }
        self.events = kept;
        out
    }

    pub fn notice(&self) -> Notice {
        let refs: Vec<&AssignmentEvent> = self.events.iter().collect();
        Notice::from_events(&refs)
    }

    /// The id [`Closed::notice`] would carry, without building the notice.
    pub fn notice_id(&self) -> String {
        let ids: Vec<&str> = self.events.iter().map(|e| e.event_id.as_str()).collect();
        crate::notice::notice_id(&ids)
    }
}

/// Events and deliveries are boxed while a window is open: the vectors grow by
/// doubling, and spare capacity of pointers costs far less than spare capacity
/// of 400-byte deliveries (the memory row of the benchmark).
#[allow(clippy::vec_box)] // deliberate: see above
struct Window<D> {
    serial: u64,
    events: Vec<Box<AssignmentEvent>>,
    /// Event id hash -> position in `events`, to spot a repeated event. Keyed
    /// by hash, not by a second copy of every id (the memory row); a hit is
    /// confirmed against the event itself, see [`Window::position`].
    index: HashMap<u64, usize>,
    deliveries: Vec<(usize, Box<D>)>,
    opened: Instant,
    deadline: Instant,
    batches: Vec<String>,
}

impl<D> Window<D> {
    /// Where the event with this id (and `hash`) is, if the window holds it.
    fn position(&self, id: &str, hash: u64) -> Option<usize> {
        match self.index.get(&hash) {
            Some(&i) if self.events[i].event_id == id => Some(i),
            // Two ids with one 64-bit hash: only the first is indexed, so
            // look through the window (never seen in practice, but exact).
            Some(_) => self.events.iter().position(|e| e.event_id == id),
            None => None,
        }
    }
}

struct BatchProgress {
    size: u32,
    seen: HashSet<String>,
    windows: HashSet<String>,
    touched: Instant,
}

impl BatchProgress {
    fn complete(&self) -> bool {
        self.seen.len() >= self.size as usize
    }
}

/// All open windows of this replica.
pub struct Coalescer<D> {
    rules: WindowRules,
    windows: HashMap<String, Window<D>>,
    batches: HashMap<String, BatchProgress>,
    /// Deadlines, lazily invalidated: an entry counts only if its window still
    /// exists with the same serial and deadline.
    deadlines: BinaryHeap<Reverse<(Instant, u64, String)>>,
    next_serial: u64,
    last_gc: Option<Instant>,
    ids: RandomState,
}

impl<D> Coalescer<D> {
    pub fn new(rules: WindowRules) -> Self {
        Coalescer {
            rules,
            windows: HashMap::new(),
            batches: HashMap::new(),
            deadlines: BinaryHeap::new(),
            next_serial: 0,
            last_gc: None,
            ids: RandomState::new(),
        }
    }

    /// Open windows.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Adds one delivery; returns the windows this closed (max events or batch complete).
    pub fn push(&mut self, event: AssignmentEvent, delivery: D, now: Instant) -> Vec<Closed<D>> {
        let key = event.assignee.user_id.clone();
        let rules = self.rules;
        if !self.windows.contains_key(&key) {
            self.next_serial += 1;
            let deadline = (now + rules.quiet).min(now + rules.max_wait);
            let window = Window {
                serial: self.next_serial,
                events: Vec::new(),
                index: HashMap::new(),
                deliveries: Vec::new(),
                opened: now,
                deadline,
                batches: Vec::new(),
            };
            self.windows.insert(key.clone(), window);
            // One heap entry per window; a later deadline moves it when it surfaces.
            self.deadlines
                .push(Reverse((deadline, self.next_serial, key.clone())));
        }
        let hash = self.ids.hash_one(&event.event_id);
        let window = self.windows.get_mut(&key).expect("just inserted");
        if let Some(i) = window.position(&event.event_id, hash) {
            // The CRM published the same event again: one event, two deliveries.
            window.deliveries.push((i, Box::new(delivery)));
            return Vec::new();
        }
        let i = window.events.len();
        window.index.entry(hash).or_insert(i);
        window.deliveries.push((i, Box::new(delivery)));
        window.deadline = (now + rules.quiet).min(window.opened + rules.max_wait);

        let mut batch_completed = false;
        if let Some(batch) = &event.batch {
            let progress = self
                .batches
                .entry(batch.id.clone())
                .or_insert_with(|| BatchProgress {
                    size: batch.size,
                    seen: HashSet::new(),
                    windows: HashSet::new(),
                    touched: now,
                });
            progress.size = progress.size.max(batch.size);
            progress.touched = now;
            let was_complete = progress.complete();
            progress.seen.insert(event.event_id.clone());
            if progress.windows.insert(key.clone()) {
                window.batches.push(batch.id.clone());
            }
            batch_completed = !was_complete && progress.complete();
        }
        window.events.push(Box::new(event));

        let mut closed = Vec::new();
        if window.events.len() >= rules.max_events {
            closed.extend(self.close(&key, CloseReason::MaxEvents));
        }
        if batch_completed {
            let batch_id = closed_batch_id(&closed, &self.windows, &key);
            if let Some(batch_id) = batch_id {
                let holders: Vec<String> = self
                    .batches
                    .get(&batch_id)
                    .map(|p| p.windows.iter().cloned().collect())
                    .unwrap_or_default();
                for holder in holders {
                    if self.all_batches_complete(&holder) {
                        closed.extend(self.close(&holder, CloseReason::BatchComplete));
                    }
                }
            }
        }
        closed
    }

    fn all_batches_complete(&self, key: &str) -> bool {
        let Some(window) = self.windows.get(key) else {
            return false;
        };
        !window.batches.is_empty()
            && window
                .batches
                .iter()
                .all(|b| self.batches.get(b).is_some_and(BatchProgress::complete))
    }

    fn close(&mut self, key: &str, reason: CloseReason) -> Option<Closed<D>> {
        let window = self.windows.remove(key)?;
        for batch_id in &window.batches {
            if let Some(progress) = self.batches.get_mut(batch_id) {
                progress.windows.remove(key);
                if progress.windows.is_empty() && progress.complete() {
                    self.batches.remove(batch_id);
                }
            }
        }
        Some(Closed {
            events: window.events.into_iter().map(|e| *e).collect(),
            deliveries: window
                .deliveries
                .into_iter()
                .map(|(i, d)| (i, *d))
                .collect(),
            reason,
            held: 0,
        })
    }

    /// When the next window is due, if any.
    ///
    /// The heap holds one entry per open window, pushed when it opened; a quiet
    /// period extended since then moves the entry when it reaches the top, so
    /// an event costs no heap push (fewer allocations, no timer churn).
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((deadline, serial, key))) = self.deadlines.peek() {
            match self.windows.get(key) {
                Some(w) if w.serial == *serial && w.deadline == *deadline => {
                    return Some(*deadline)
                }
                Some(w) if w.serial == *serial => {
                    let moved = w.deadline;
                    let Reverse((_, serial, key)) = self.deadlines.pop().expect("peeked");
                    self.deadlines.push(Reverse((moved, serial, key)));
                }
                _ => {
                    self.deadlines.pop();
                }
            }
        }
        None
    }

    /// Closes every window whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Closed<D>> {
        let mut closed = Vec::new();
        while let Some(deadline) = self.next_deadline() {
            if deadline > now {
                break;
            }
            let Reverse((_, _, key)) = self.deadlines.pop().expect("peeked");
            let window = &self.windows[&key];
            let reason = if window.deadline >= window.opened + self.rules.max_wait {
                CloseReason::MaxWait
            } else {
                CloseReason::Quiet
            };
            closed.extend(self.close(&key, reason));
        }
        self.forget_stale_batches(now);
        closed
    }

    /// Closes `key`'s window now, if one is open (an accept releases it with
    /// the user's held events).
    pub fn take(&mut self, key: &str) -> Option<Closed<D>> {
        self.close(key, CloseReason::Release)
    }

    /// Closes every window now (shutdown, or a flush).
    pub fn drain(&mut self) -> Vec<Closed<D>> {
        let keys: Vec<String> = self.windows.keys().cloned().collect();
        self.deadlines.clear();
        keys.into_iter()
            .filter_map(|k| self.close(&k, CloseReason::Shutdown))
            .collect()
    }

    /// An incomplete batch no open window refers to is kept a while (its next
    /// events may still come), then forgotten so memory stays bounded.
    fn forget_stale_batches(&mut self, now: Instant) {
        let every = self.rules.max_wait.max(Duration::from_secs(1));
        if self.last_gc.is_some_and(|t| now < t + every) {
            return;
        }
        self.last_gc = Some(now);
        let keep_for = self.rules.max_wait * 6;
        self.batches
            .retain(|_, p| !p.windows.is_empty() || now < p.touched + keep_for);
    }
}

/// The batch id of the event just pushed (its window may have just been closed).
fn closed_batch_id<D>(
    closed: &[Closed<D>],
    windows: &HashMap<String, Window<D>>,
    key: &str,
) -> Option<String> {
    let last_event = match windows.get(key) {
        Some(w) => w.events.last().map(|e| &**e),
        None => closed.last().and_then(|c| c.events.last()),
    };
    last_event
        .and_then(|e| e.batch.as_ref())
        .map(|b| b.id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse;

    fn ev(id: &str, user: &str, batch: Option<(&str, u32)>) -> AssignmentEvent {
        let mut v = serde_json::json!({
            "event_id": id, "event_type": "customer.assigned",
            "occurred_at": "2026-11-25T14:03:27+08:00", "source": "batch",
            "assignee": {"user_id": user}, "customer": {"id": id, "name": format!("客户{id}")}
        });
        if let Some((b, size)) = batch {
            v["batch"] = serde_json::json!({"id": b, "size": size});
        }
        parse(v.to_string().as_bytes()).unwrap()
    }

    fn rules(quiet_ms: u64, max_ms: u64, max: usize) -> WindowRules {
        WindowRules {
            quiet: Duration::from_millis(quiet_ms),
            max_wait: Duration::from_millis(max_ms),
            max_events: max,
        }
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn quiet_period_closes_and_new_events_extend_it() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(rules(100, 1000, 50));
        assert!(c.push(ev("a", "u", None), 1, t0).is_empty());
        assert!(c.push(ev("b", "u", None), 2, ms(t0, 90)).is_empty());
        assert_eq!(c.next_deadline(), Some(ms(t0, 190)));
        assert!(c.expire(ms(t0, 189)).is_empty());
        let closed = c.expire(ms(t0, 190));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].reason, CloseReason::Quiet);
        assert_eq!(closed[0].notice().customer_count, 2);
        assert!(c.is_empty() && c.next_deadline().is_none());
    }

    #[test]
    fn deadlines_of_several_windows_come_in_order_and_stale_ones_are_skipped() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(rules(100, 1000, 3));
        c.push(ev("a1", "u1", None), 1, t0);
        c.push(ev("b1", "u2", None), 2, ms(t0, 50));
        // u1's quiet period moves past u2's.
        c.push(ev("a2", "u1", None), 3, ms(t0, 80));
        assert_eq!(c.next_deadline(), Some(ms(t0, 150)));
        assert!(c.expire(ms(t0, 149)).is_empty());
        let closed = c.expire(ms(t0, 150));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].events[0].assignee.user_id, "u2");
        assert_eq!(c.next_deadline(), Some(ms(t0, 180)));
        let closed = c.expire(ms(t0, 180));
        assert_eq!(
            (closed[0].events.len(), closed[0].reason),
            (2, CloseReason::Quiet)
        );

        // A window closed by its event count leaves its deadline behind; the
        // assignee's next window has its own, and the old one closes nothing.
        for (i, id) in ["c1", "c2", "c3"].iter().enumerate() {
            let closed = c.push(ev(id, "u3", None), i as u64, ms(t0, 200));
            assert_eq!(closed.len(), usize::from(i == 2));
        }
        c.push(ev("c4", "u3", None), 4, ms(t0, 250));
        assert_eq!(c.next_deadline(), Some(ms(t0, 350)));
        assert!(c.expire(ms(t0, 300)).is_empty(), "the stale deadline");
        let closed = c.expire(ms(t0, 350));
        assert_eq!(closed[0].events.len(), 1);
        assert!(c.is_empty() && c.next_deadline().is_none());
    }

    #[test]
    fn max_wait_caps_a_busy_window() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(rules(100, 250, 50));
        for i in 0..5u64 {
            c.push(ev(&format!("e{i}"), "u", None), i, ms(t0, i * 60));
        }
        assert_eq!(c.next_deadline(), Some(ms(t0, 250)));
        let closed = c.expire(ms(t0, 250));
        assert_eq!(closed[0].reason, CloseReason::MaxWait);
        assert_eq!(closed[0].events.len(), 5);
    }

    #[test]
    fn max_events_splits_120_into_50_50_20_and_batch_completion_closes_the_last() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(rules(30_000, 60_000, 50));
        let mut sizes = Vec::new();
        for i in 0..120u64 {
            for closed in c.push(ev(&format!("e{i}"), "u", Some(("b", 120))), i, ms(t0, i)) {
                sizes.push((closed.events.len(), closed.reason));
            }
        }
        assert_eq!(
            sizes,
            vec![
                (50, CloseReason::MaxEvents),
                (50, CloseReason::MaxEvents),
                (20, CloseReason::BatchComplete)
            ]
        );
        assert!(c.is_empty());
    }

    #[test]
    fn a_batch_over_several_assignees_closes_all_of_them_at_its_last_event() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(rules(30_000, 60_000, 50));
        let mut closed = Vec::new();
        for i in 0..9u64 {
            let user = ["u1", "u2", "u3"][i as usize % 3];
            closed.extend(c.push(ev(&format!("e{i}"), user, Some(("b", 9))), i, ms(t0, i)));
            if i < 8 {
                assert!(closed.is_empty(), "closed early at {i}");
            }
        }
        assert_eq!(closed.len(), 3);
        assert!(closed
            .iter()
            .all(|c| c.events.len() == 3 && c.reason == CloseReason::BatchComplete));
    }

    #[test]
    fn a_window_waits_for_every_batch_it_holds() {
        let t0 = Instant::now();
        // Batch A (of one) completes at once, but the window also holds batch B.
        let mut c2 = Coalescer::new(rules(30_000, 60_000, 50));
        c2.push(ev("b1", "u", Some(("B", 2))), 1, t0);
        assert!(c2.push(ev("a1", "u", Some(("A", 1))), 2, t0).is_empty());
        let closed = c2.push(ev("b2", "u", Some(("B", 2))), 3, t0);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].events.len(), 3);
    }

    #[test]
    fn the_same_event_twice_counts_once_but_both_deliveries_are_kept() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(rules(100, 1000, 50));
        c.push(ev("a", "u", None), 1, t0);
        c.push(ev("a", "u", None), 2, ms(t0, 10));
        c.push(ev("b", "u", None), 3, ms(t0, 20));
        let closed = c.drain();
        assert_eq!(closed[0].events.len(), 2);
        assert_eq!(closed[0].deliveries, vec![(0, 1), (0, 2), (1, 3)]);
        assert!(closed[0].notice().summary);
    }

    #[test]
    fn a_repeated_event_is_found_even_when_two_ids_share_a_hash() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(rules(100, 1000, 50));
        c.push(ev("a", "u", None), 1, t0);
        c.push(ev("b", "u", None), 2, t0);
        // Force a collision: "b" indexed under the hash of "a" is not found by
        // the index, only by the exact comparison that backs it.
        let w = c.windows.get_mut("u").unwrap();
        let hash_a = c.ids.hash_one("a");
        w.index.clear();
        w.index.insert(hash_a, 0);
        assert_eq!(w.position("a", hash_a), Some(0));
        assert_eq!(w.position("b", hash_a), Some(1));
        assert_eq!(w.position("c", hash_a), None);
    }

    #[test]
    fn duplicate_events_do_not_complete_a_batch_early() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(rules(30_000, 60_000, 50));
        c.push(ev("a", "u", Some(("B", 2))), 1, t0);
        assert!(c.push(ev("a", "u", Some(("B", 2))), 2, t0).is_empty());
        assert_eq!(c.push(ev("b", "u", Some(("B", 2))), 3, t0).len(), 1);
    }
}
