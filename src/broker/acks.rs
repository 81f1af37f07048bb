//! The acks of one consuming channel, sent in as few frames as possible.
//!
//! Windows settle out of order, so acking each delivery on its own costs the
//! broker and this process one frame and one promise per event (most of the
//! gap between the service and a bare consumer in the benchmark). Here a
//! settled delivery is only marked; a flusher sends one `multiple` ack for the
//! longest run of settled tags at the front, and acks singly a settled delivery
//! that a held one in front of it (an open window, a held fault) has kept
//! waiting longer than [`LINGER`]. Nothing is acked before it is settled:
//!
//! - a `multiple` ack names a tag that is settled and not yet acked (the
//!   broker closes the channel when the tag it names is not outstanding), and
//!   covers only tags that are settled, or released, or already acked singly;
//! - a release (nack) is sent before its tag stops blocking the front, so a
//!   later `multiple` ack never overtakes it;
//! - every frame goes out in the order it was planned (one lock around
//!   planning and sending);
//! - a tag that breaks the channel's sequence turns `multiple` acks off for
//!   the channel: every settled delivery is then acked on its own.
//!
//! The `unacked_deliveries` gauge falls when the ack frame is sent, so it
//! keeps matching what the broker holds.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::BasicAckOptions;
use lapin::Channel;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::warn;

use crate::metrics::Metrics;

/// How long a settled delivery waits for the ones in front of it before it is
/// acked on its own.
pub const LINGER: Duration = Duration::from_millis(25);

/// One channel's acks. Cheap to clone; every delivery of the channel holds one.
#[derive(Clone)]
pub struct Acks {
    inner: Arc<Inner>,
}

struct Inner {
    channel: Channel,
    ledger: Mutex<Ledger>,
    /// Planning and sending happen under this lock, so frames leave in plan order.
    sending: tokio::sync::Mutex<()>,
    wake: Notify,
    /// Set when the session is given up: unsettled deliveries are left to the
    /// channel's close (see `Pending`).
    abandoned: AtomicBool,
    metrics: Arc<Metrics>,
}

/// Stops the flusher when the session that started it ends.
pub struct Flusher(tokio::task::JoinHandle<()>);

impl Drop for Flusher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Acks {
    /// Acks for `channel`, with the task that sends them.
    pub fn start(channel: Channel, metrics: Arc<Metrics>) -> (Acks, Flusher) {
        let acks = Acks {
            inner: Arc::new(Inner {
                channel,
                ledger: Mutex::new(Ledger::default()),
                sending: tokio::sync::Mutex::new(()),
                wake: Notify::new(),
                abandoned: AtomicBool::new(false),
                metrics,
            }),
        };
        let flusher = tokio::spawn(acks.clone().run());
        (acks, Flusher(flusher))
    }

    /// A delivery arrived (called in arrival order).
    pub fn received(&self, tag: u64) {
        self.inner.metrics.unacked_deliveries.inc();
        self.ledger().received(tag);
    }

    /// The delivery may be acked: its notice was accepted, or its copy is safe.
    pub fn settled(&self, tag: u64) {
        self.ledger().settled(tag, Instant::now());
        self.inner.wake.notify_one();
    }

    /// The delivery went back to the queue (its nack was sent) or its channel
    /// is closing; it no longer holds back the acks behind it.
    pub fn released(&self, tag: u64) {
        self.inner.metrics.unacked_deliveries.dec();
        self.ledger().released(tag);
        self.inner.wake.notify_one();
    }

    /// An unsettled delivery left to the channel's close (its session was
    /// given up): still outstanding, so it keeps blocking the acks behind it.
    pub fn left_to_close(&self) {
        self.inner.metrics.unacked_deliveries.dec();
    }

    /// The session is given up: unsettled deliveries are left to the close.
    pub fn abandon(&self) {
        self.inner.abandoned.store(true, Ordering::SeqCst);
    }

    pub fn abandoned(&self) -> bool {
        self.inner.abandoned.load(Ordering::SeqCst)
    }

    /// Whether acks can still reach the broker on this channel.
    pub fn usable(&self) -> bool {
        self.inner.channel.status().connected()
    }

    /// Sends every settled ack now, whatever blocks them (before the consumer
    /// is cancelled at shutdown).
    pub async fn flush(&self) {
        self.send_planned(Duration::ZERO).await;
    }

    async fn run(self) {
        loop {
            let next = self.send_planned(LINGER).await;
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = self.inner.wake.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.inner.wake.notified().await,
            }
        }
    }

    /// Plans and sends under the sending lock; returns when a lingering ack is due.
    async fn send_planned(&self, linger: Duration) -> Option<Instant> {
        let _order = self.inner.sending.lock().await;
        let plan = self.ledger().plan(Instant::now(), linger);
        let ch = &self.inner.channel;
        if let Some((tag, count)) = plan.multiple {
            self.inner.metrics.unacked_deliveries.dec_by(count as i64);
            if let Err(e) = ch.basic_ack(tag, BasicAckOptions { multiple: true }).await {
                warn!(error = %e, deliveries = count, "acks not sent (channel closed); the broker will redeliver");
            }
        }
        for tag in plan.singles {
            self.inner.metrics.unacked_deliveries.dec();
            if let Err(e) = ch.basic_ack(tag, BasicAckOptions::default()).await {
                warn!(error = %e, "ack not sent (channel closed); the broker will redeliver");
            }
        }
        plan.next_wake
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.inner.ledger.lock().expect("not poisoned")
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Settled but never sent (the session ended first): the channel's
        // close returns them.
        let waiting = self.ledger.get_mut().map_or(0, |l| l.waiting());
        self.metrics.unacked_deliveries.dec_by(waiting as i64);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Unsettled: nothing at or behind it may be covered by a `multiple` ack.
    Held,
    /// Settled, not yet acked.
    Settled,
    /// Acked singly, or released: no longer outstanding for the ack.
    Done,
}

/// Which tags are held, settled or done; pure bookkeeping, no I/O.
struct Ledger {
    /// Tag of `slots[0]` (a channel's first delivery is tag 1).
    base: u64,
    slots: VecDeque<Slot>,
    /// Settled tags in the order they settled, for the linger: a plan looks
    /// only at those due, not at every slot behind a held one.
    settled_at: VecDeque<(Instant, u64)>,
    /// Settled slots not yet planned for sending.
    settled: usize,
    /// Tags settled after the sequence broke: each acked on its own.
    loose: Vec<u64>,
    broken: bool,
}

/// What one flush sends: a `multiple` ack (tag, how many deliveries it
/// settles), single acks, and when to look again for lingering ones.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    multiple: Option<(u64, usize)>,
    singles: Vec<u64>,
    next_wake: Option<Instant>,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            base: 1,
            slots: VecDeque::new(),
            settled_at: VecDeque::new(),
            settled: 0,
            loose: Vec::new(),
            broken: false,
        }
    }
}

impl Ledger {
    fn received(&mut self, tag: u64) {
        if self.broken {
            return;
        }
        let next = self.base + self.slots.len() as u64;
        if tag == next {
            self.slots.push_back(Slot::Held);
            return;
        }
        warn!(
            tag,
            expected = next,
            "delivery tags out of sequence; acking one by one on this channel"
        );
        // What is settled goes singly; what is held will, once settled.
        let base = self.base;
        for (i, slot) in self.slots.drain(..).enumerate() {
            if slot == Slot::Settled {
                self.loose.push(base + i as u64);
            }
        }
        self.settled_at.clear();
        self.settled = 0;
        self.broken = true;
    }

    fn index(&self, tag: u64) -> Option<usize> {
        let i = usize::try_from(tag.checked_sub(self.base)?).ok()?;
        (!self.broken && i < self.slots.len()).then_some(i)
    }

    fn settled(&mut self, tag: u64, now: Instant) {
        match self.index(tag) {
            Some(i) if self.slots[i] == Slot::Held => {
                self.slots[i] = Slot::Settled;
                self.settled += 1;
                self.settled_at.push_back((now, tag));
            }
            Some(_) => {} // settled twice: the first one counts
            None => self.loose.push(tag),
        }
    }

    fn released(&mut self, tag: u64) {
        if let Some(i) = self.index(tag) {
            if self.slots[i] == Slot::Held {
                self.slots[i] = Slot::Done;
            }
        }
    }

    /// Settled deliveries not yet planned for sending.
    fn waiting(&self) -> usize {
        self.loose.len() + self.settled
    }

    /// Whether `tag` is settled and waiting behind the front.
    fn is_waiting(&self, tag: u64) -> bool {
        self.index(tag)
            .is_some_and(|i| self.slots[i] == Slot::Settled)
    }

    /// The front's run of settled or done tags goes in one `multiple` ack
    /// (named by its last settled tag); settled tags behind a held one go
    /// singly once they waited `linger`.
    fn plan(&mut self, now: Instant, linger: Duration) -> Plan {
        let mut plan = Plan {
            singles: std::mem::take(&mut self.loose),
            ..Plan::default()
        };
        let mut count = 0;
        let mut last_settled = None;
        while let Some(&slot) = self.slots.front() {
            match slot {
                Slot::Held => break,
                Slot::Settled => {
                    count += 1;
                    last_settled = Some(self.base);
                }
                Slot::Done => {}
            }
            self.slots.pop_front();
            self.base += 1;
        }
        self.settled -= count;
        plan.multiple = last_settled.map(|t| (t, count));
        // Oldest first: those past the linger go singly; the first one not
        // yet due says when to look again. Entries the run covered are dropped.
        while let Some(&(at, tag)) = self.settled_at.front() {
            if !self.is_waiting(tag) {
                self.settled_at.pop_front();
                continue;
            }
            if now.saturating_duration_since(at) < linger {
                plan.next_wake = Some(at + linger);
                break;
            }
            self.settled_at.pop_front();
            let i = self.index(tag).expect("waiting implies a slot");
            self.slots[i] = Slot::Done;
            self.settled -= 1;
            plan.singles.push(tag);
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(tags: std::ops::RangeInclusive<u64>) -> Ledger {
        let mut l = Ledger::default();
        for t in tags {
            l.received(t);
        }
        l
    }

    #[test]
    fn a_settled_front_goes_in_one_multiple_ack_named_by_its_last_settled_tag() {
        let now = Instant::now();
        let mut l = ledger(1..=5);
        for t in [2, 1, 3] {
            l.settled(t, now);
        }
        let p = l.plan(now, LINGER);
        assert_eq!(p.multiple, Some((3, 3)));
        assert!(p.singles.is_empty());
        // Nothing left to send until 4 or 5 settles.
        assert_eq!(l.plan(now + LINGER * 10, LINGER), Plan::default());
    }

    #[test]
    fn nothing_unsettled_is_ever_covered() {
        let now = Instant::now();
        let mut l = ledger(1..=6);
        l.settled(1, now);
        l.settled(3, now);
        l.settled(6, now);
        let p = l.plan(now, LINGER);
        assert_eq!(p.multiple, Some((1, 1)), "2 is held: the run stops at 1");
        assert!(p.singles.is_empty(), "3 and 6 linger first");
        assert_eq!(p.next_wake, Some(now + LINGER));
        // Past the linger: 3 and 6 go singly; 2, 4 and 5 are still held.
        let p = l.plan(now + LINGER, LINGER);
        assert_eq!(p.multiple, None);
        assert_eq!(p.singles, vec![3, 6]);
        assert_eq!(p.next_wake, None);
        // 2 settles: the run 2..=3 ends at 2 (3 was acked singly and is not
        // outstanding, so it must not name the multiple ack).
        l.settled(2, now + LINGER);
        let p = l.plan(now + LINGER, LINGER);
        assert_eq!(p.multiple, Some((2, 1)));
        assert!(p.singles.is_empty());
    }

    #[test]
    fn a_released_tag_unblocks_the_run_without_being_named_or_counted() {
        let now = Instant::now();
        let mut l = ledger(1..=13);
        for t in 1..10 {
            l.released(t);
        }
        l.settled(10, now);
        l.settled(12, now);
        assert_eq!(l.plan(now, LINGER).multiple, Some((10, 1)));
        l.released(11);
        l.released(13);
        let p = l.plan(now, LINGER);
        assert_eq!(p.multiple, Some((12, 1)));
        // Only released tags left at the front: no frame at all.
        l.received(14);
        l.released(14);
        assert_eq!(l.plan(now, LINGER), Plan::default());
        assert_eq!(l.waiting(), 0);
    }

    #[test]
    fn a_first_tag_other_than_1_turns_multiple_acks_off() {
        let now = Instant::now();
        let mut l = ledger(3..=4);
        l.settled(4, now);
        l.settled(3, now);
        let p = l.plan(now, LINGER);
        assert_eq!(p.multiple, None);
        assert_eq!(p.singles, vec![4, 3]);
    }

    #[test]
    fn a_flush_with_no_linger_sends_everything_settled() {
        let now = Instant::now();
        let mut l = ledger(1..=4);
        l.settled(2, now);
        l.settled(4, now);
        let p = l.plan(now, Duration::ZERO);
        assert_eq!(p.multiple, None);
        assert_eq!(p.singles, vec![2, 4]);
        assert_eq!(l.waiting(), 0);
    }

    #[test]
    fn a_tag_out_of_sequence_turns_multiple_acks_off() {
        let now = Instant::now();
        let mut l = ledger(1..=2);
        l.received(7);
        l.settled(7, now);
        l.settled(1, now);
        l.settled(2, now);
        l.received(8);
        l.settled(8, now);
        let p = l.plan(now, LINGER);
        assert_eq!(p.multiple, None);
        assert_eq!(p.singles, vec![7, 1, 2, 8]);
        assert_eq!(l.plan(now, LINGER), Plan::default());
    }
}
