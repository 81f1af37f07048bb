//! The fleet-wide rate budget (contract section 3) and the two things that
//! stop calls altogether: a quota pause (`45011`/`45009`) and a held
//! configuration fault, during which only one retry of the failed notice
//! goes out every `NOTIFIER_CONFIG_RETRY`.
//!
//! `governor` keeps the budget: even spacing at R with a bucket of B.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{watch, OwnedMutexGuard};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::http::Health;
use crate::metrics::Metrics;

/// How close to its rate slot a call stops sleeping and yields instead (the
/// timer's resolution is a millisecond, and a late take shifts every later
/// slot when the burst is 1).
const BUDGET_SPIN: Duration = Duration::from_micros(1500);

/// The rate budget of contract section 3: even spacing at `rate`, `burst` back to back.
pub fn quota(rate_per_sec: f64, burst: u32) -> Quota {
    let period = Duration::from_secs_f64(1.0 / rate_per_sec).max(Duration::from_nanos(1));
    Quota::with_period(period)
        .expect("period is positive")
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("at least 1"))
}

/// Which quota paused the calls (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    Minute,
    Daily,
}

impl QuotaKind {
    fn as_str(self) -> &'static str {
        match self {
            QuotaKind::Minute => "minute",
            QuotaKind::Daily => "daily",
        }
    }

    fn errcode(self) -> i64 {
        match self {
            QuotaKind::Minute => 45011,
            QuotaKind::Daily => 45009,
        }
    }
}

/// A quota pause longer than this is not waited out with deliveries held:
/// the window is parked in a retry queue instead. RabbitMQ closes a channel
/// that holds a delivery unacked past its `consumer_timeout` (30 min by
/// default, sometimes set to a minute or two); this stays well under that,
/// beside the time a delivery already spends in its window.
pub const PAUSE_HOLD_LIMIT: Duration = Duration::from_secs(10);

/// The right to retry a held notice while a configuration fault stands: one
/// task at a time holds it.
pub type ProbeTurn = OwnedMutexGuard<()>;

/// What `take` gives a window.
pub enum Turn {
    /// One call from the rate budget: call now.
    Go,
    /// A configuration fault is held and nobody retries a notice for it: this
    /// window's notice becomes the one retried.
    Probe(ProbeTurn),
    /// A quota pause has `left` longer to run (over `PAUSE_HOLD_LIMIT`):
    /// park the window rather than hold its deliveries. `errcode` is the
    /// quota's (45011 or 45009).
    Paused { left: Duration, errcode: i64 },
}

/// Shared by every call of this replica; outlives broker sessions.
pub struct Budget {
    limiter: DefaultDirectRateLimiter,
    clock: DefaultClock,
    /// Calls take the budget one at a time, in the order they asked (a fair
    /// lock), so thousands of waiting windows do not all wake at every slot.
    turn: tokio::sync::Mutex<()>,
    /// Daily-quota answers (45009) in a row, ended by a delivered notice.
    daily_run: std::sync::atomic::AtomicU32,
    /// Until when every call is paused, and by which quota.
    pause_until: Mutex<Option<(Instant, QuotaKind)>>,
    /// The configuration fault being held, if any.
    fault: watch::Sender<Option<String>>,
    probe: Arc<tokio::sync::Mutex<()>>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl Budget {
    /// The bucket starts empty: a replica that takes over from another must
    /// not add its whole burst on top of the calls the other just made.
    pub fn new(rate_per_sec: f64, burst: u32, health: Arc<Health>, metrics: Arc<Metrics>) -> Self {
        let clock = DefaultClock::default();
        let limiter = RateLimiter::direct_with_clock(quota(rate_per_sec, burst), clock.clone());
        while limiter.check().is_ok() {}
        Budget {
            limiter,
            clock,
            turn: tokio::sync::Mutex::new(()),
            pause_until: Mutex::new(None),
            daily_run: std::sync::atomic::AtomicU32::new(0),
            fault: watch::channel(None).0,
            probe: Arc::new(tokio::sync::Mutex::new(())),
            health,
            metrics,
        }
    }

    /// Waits while a configuration fault is held, then for a quota pause to
    /// end (if it ends within `PAUSE_HOLD_LIMIT`), then takes one call from the
    /// rate budget. While a fault is held and nobody retries a notice for it
    /// (the one that did was parked or its task ended), the caller gets the
    /// probe turn instead: its notice becomes the one retried.
    pub async fn take(&self) -> Turn {
        let entered = Instant::now();
        loop {
            if let Some(probe) = self.wait_while_held().await {
                return Turn::Probe(probe);
            }
            let turn = self.turn.lock().await;
            if self.fault.borrow().is_some() {
                continue; // held while this call waited for its turn
            }
            return match self.take_in_turn(turn, Some(entered)).await {
                // Held while this call waited for its rate slot (another
                // call's answer): the slot goes unused, and this call waits
                // for the fault like the others.
                Ok(()) if self.fault.borrow().is_some() => continue,
                Ok(()) => Turn::Go,
                Err((left, errcode)) => Turn::Paused { left, errcode },
            };
        }
    }

    /// Waits while a configuration fault is held, without taking a call
    /// from the budget: `None` once it is released, or the probe turn when
    /// nobody retries a notice for it (its notice becomes the one retried).
    pub async fn wait_while_held(&self) -> Option<ProbeTurn> {
        let mut fault = self.fault.subscribe();
        while fault.borrow_and_update().is_some() {
            tokio::select! {
                _ = fault.changed() => {}
                probe = self.probe.clone().lock_owned() => {
                    if self.fault.borrow().is_some() {
                        return Some(probe);
                    }
                }
            }
        }
        None
    }

    /// Whether a configuration fault is held.
    pub fn is_held(&self) -> bool {
        self.fault.borrow().is_some()
    }

    /// As `take`, for the one retry of a held notice: the fault does not stop
    /// it, a long quota pause does (`Err` with the time left and the quota's errcode).
    pub async fn take_as_probe(&self, _turn: &ProbeTurn) -> Result<(), (Duration, i64)> {
        let entered = Instant::now();
        let turn = self.turn.lock().await;
        self.take_in_turn(turn, Some(entered)).await
    }

    /// As `take`, whatever fault is held, waiting out any pause (the start-up
    /// probe, which holds no delivery).
    pub async fn take_unheld(&self) {
        let turn = self.turn.lock().await;
        let _ = self.take_in_turn(turn, None).await;
    }

    /// One more 45009 in a row: how many now.
    pub fn daily_quota_run(&self) -> u32 {
        self.daily_run
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            .saturating_add(1)
    }

    /// A notice was delivered: the run of 45009s is over.
    pub fn quota_streak_ends(&self) {
        self.daily_run.store(0, std::sync::atomic::Ordering::SeqCst);
    }

    /// A replica that becomes the active consumer starts with an empty
    /// bucket, as at process start: a standby's bucket refills while it
    /// waits, and its burst must not add to the calls the replica it takes
    /// over from just made.
    pub fn empty(&self) {
        while self.limiter.check().is_ok() {}
    }

    /// Waits for a pause, then for the rate slot. With `entered` (when the
    /// caller, which holds deliveries, started to wait), a pause that would
    /// make its wait longer than `PAUSE_HOLD_LIMIT` in all is not waited out:
    /// `Err` with the time left and the quota's errcode.
    ///
    /// A pause that began while the call waited for its slot (another call's
    /// 45011 or 45009 came back meanwhile) stops it too: the slot goes
    /// unused and the pause is waited for (or handed back) as if it had
    /// begun before; no call leaves after the answer that paused them all.
    async fn take_in_turn(
        &self,
        _turn: tokio::sync::MutexGuard<'_, ()>,
        entered: Option<Instant>,
    ) -> Result<(), (Duration, i64)> {
        let started = Instant::now();
        loop {
            while let Some((t, kind)) = self.paused_until() {
                let left = t.saturating_duration_since(Instant::now());
                if entered.is_some_and(|e| e.elapsed() + left > PAUSE_HOLD_LIMIT) {
                    return Err((left, kind.errcode()));
                }
                tokio::time::sleep_until(t).await;
            }
            while let Err(not_until) = self.limiter.check() {
                let wait = not_until.wait_time_from(self.clock.now());
                if wait > BUDGET_SPIN {
                    tokio::time::sleep(wait - BUDGET_SPIN).await;
                } else {
                    tokio::task::yield_now().await;
                }
            }
            if self.paused_until().is_none() {
                break;
            }
        }
        self.metrics
            .rate_limiter_wait
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The end of the pause running now, and its quota, if one runs.
    fn paused_until(&self) -> Option<(Instant, QuotaKind)> {
        let until = *self.pause_until.lock().expect("not poisoned");
        until.filter(|(t, _)| *t > Instant::now())
    }

    /// Pauses every call of this replica for `d` (a later end wins).
    pub fn pause(&self, d: Duration, kind: QuotaKind) {
        let until = Instant::now() + d;
        let mut p = self.pause_until.lock().expect("not poisoned");
        if p.is_none_or(|(cur, _)| cur < until) {
            *p = Some((until, kind));
            self.health
                .set_quota_pause(kind.as_str(), kind.errcode(), until.into_std());
        }
        drop(p);
        self.metrics.quota_pause(kind.as_str());
        warn!(
            quota = kind.as_str(),
            seconds = d.as_secs_f64(),
            "pausing every WeChat call (quota)"
        );
    }

    /// Holds a configuration fault: calls stop, `/readyz` reports it. Returns
    /// the probe turn if nobody else retries a held notice yet.
    pub fn hold(&self, detail: &str) -> Option<ProbeTurn> {
        let newly = self.fault.send_if_modified(|f| {
            let changed = f.as_deref() != Some(detail);
            *f = Some(detail.to_string());
            changed
        });
        if newly {
            warn!(%detail, "configuration fault: holding every message, calling WeChat only to retry one notice");
        }
        self.health.set_fault(Some(detail.to_string()));
        self.metrics.config_fault.set(1);
        self.probe.clone().try_lock_owned().ok()
    }

    /// The fault is gone: calls resume.
    pub fn release(&self) {
        let was = self.fault.send_replace(None);
        self.health.set_fault(None);
        self.metrics.config_fault.set(0);
        if was.is_some() {
            info!("configuration fault cleared: calls resume");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::dispatch::policy::{until_next_minute, MINUTE_MARGIN};

    fn budget() -> Budget {
        Budget::new(
            1000.0,
            1,
            Arc::new(Health::default()),
            Arc::new(Metrics::new()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_minute_quota_no_call_goes_before_the_minute_boundary_and_one_goes_right_after()
    {
        let b = budget();
        // 41.3 s into a minute: 18.7 s to the boundary.
        let now = UNIX_EPOCH + Duration::from_millis(1_795_615_380_000 + 41_300);
        let boundary = Duration::from_millis(18_700);
        let start = Instant::now();
        b.pause(until_next_minute(now), QuotaKind::Minute);
        let mut call = Box::pin(b.take_unheld());
        tokio::time::advance(boundary - Duration::from_millis(1)).await;
        assert!(
            futures_util::poll!(&mut call).is_pending(),
            "no call before the minute boundary"
        );
        call.await;
        let waited = start.elapsed();
        assert!(
            waited >= boundary && waited <= boundary + MINUTE_MARGIN + Duration::from_millis(5),
            "the call goes right after the boundary: {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_fault_stops_every_call_but_the_probe_until_released() {
        let b = Arc::new(budget());
        let turn = b
            .hold("WeChat answered errcode 85088")
            .expect("first holder probes");
        assert!(b.hold("again").is_none(), "one probe at a time");
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move { matches!(b.take().await, Turn::Go) })
        };
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(
            !waiting.is_finished(),
            "held for as long as the fault lasts"
        );
        b.take_as_probe(&turn).await.expect("no pause");
        assert!(b
            .health
            .ready()
            .unwrap_err()
            .contains("configuration fault: again"));
        b.release();
        drop(turn);
        assert!(waiting.await.unwrap(), "a normal call once released");
        let reason = b.health.ready().unwrap_err();
        assert!(!reason.contains("configuration fault"), "{reason}");
    }

    #[tokio::test(start_paused = true)]
    async fn when_the_retried_notice_leaves_a_waiting_one_takes_over_the_retries() {
        let b = Arc::new(budget());
        let turn = b
            .hold("WeChat answered errcode 85088")
            .expect("first holder probes");
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move { matches!(b.take().await, Turn::Probe(_)) })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // The retried notice was parked: its task drops the turn, the fault stays.
        drop(turn);
        assert!(
            waiting.await.unwrap(),
            "the waiting notice becomes the one retried"
        );
        assert!(b.is_held());
    }

    /// Real time here: governor's clock is the real one, and a paused tokio
    /// clock would run ahead of it (and past the pause) while the call spins
    /// for its slot. The first poll leaves the call waiting for its slot, past
    /// its check for a pause; only then does another call's 45011 come back.
    #[tokio::test]
    async fn a_pause_that_begins_while_a_call_waits_for_its_slot_stops_that_call() {
        let b = Budget::new(
            10.0,
            1,
            Arc::new(Health::default()),
            Arc::new(Metrics::new()),
        );
        let mut call = Box::pin(b.take());
        assert!(
            futures_util::poll!(&mut call).is_pending(),
            "waiting for its slot (the bucket starts empty)"
        );
        b.pause(PAUSE_HOLD_LIMIT * 6, QuotaKind::Minute);
        match call.await {
            Turn::Paused { errcode, .. } => assert_eq!(errcode, 45011),
            _ => panic!("the call went out (or probed) after the pause began"),
        }
    }

    /// As above, with a configuration fault held while the call waits for its
    /// slot: it waits for the fault like every other call, and goes once the
    /// fault is released.
    #[tokio::test]
    async fn a_fault_held_while_a_call_waits_for_its_slot_stops_that_call() {
        let b = Budget::new(
            10.0,
            1,
            Arc::new(Health::default()),
            Arc::new(Metrics::new()),
        );
        let mut call = Box::pin(b.take());
        assert!(futures_util::poll!(&mut call).is_pending());
        let turn = b
            .hold("WeChat answered errcode 40164")
            .expect("the probe turn");
        // Three slots' time: the call would have gone at the first.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut call)
                .await
                .is_err(),
            "the call went out after the fault was held"
        );
        b.release();
        drop(turn);
        assert!(
            matches!(call.await, Turn::Go),
            "a normal call once released"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_replica_starts_with_an_empty_bucket() {
        let b = Budget::new(
            10.0,
            5,
            Arc::new(Health::default()),
            Arc::new(Metrics::new()),
        );
        assert!(b.limiter.check().is_err(), "no burst at start");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_longer_than_the_hold_limit_is_not_waited_out_with_deliveries_held() {
        let b = budget();
        b.health.set_broker_up(true);
        b.health.set_consuming(true);
        b.pause(PAUSE_HOLD_LIMIT * 6, QuotaKind::Daily);
        match b.take().await {
            Turn::Paused { left, errcode } => {
                assert_eq!(errcode, 45009);
                assert!(left > PAUSE_HOLD_LIMIT * 5, "{left:?}");
            }
            _ => panic!("a long pause is handed back, not waited out"),
        }
        assert!(b
            .health
            .ready()
            .unwrap_err()
            .contains("daily quota reached (errcode 45009)"));
        // Within the limit the call waits for the pause to end.
        tokio::time::advance(PAUSE_HOLD_LIMIT * 5 + Duration::from_secs(1)).await;
        let start = Instant::now();
        assert!(matches!(b.take().await, Turn::Go));
        assert!(start.elapsed() <= PAUSE_HOLD_LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_that_becomes_active_empties_its_refilled_bucket() {
        let b = Budget::new(
            10.0,
            5,
            Arc::new(Health::default()),
            Arc::new(Metrics::new()),
        );
        std::thread::sleep(Duration::from_millis(600)); // governor's clock is the real one
        assert!(
            b.limiter.check().is_ok(),
            "the bucket refilled while waiting"
        );
        b.empty();
        assert!(b.limiter.check().is_err(), "empty at takeover");
    }
}
