//! From a closed window to acked messages: the fleet-wide rate budget, one call
//! in flight per assignee, and what each WeChat outcome means for the messages
//! (ack, retry in memory, park in a retry queue, dead-letter, or stop for a
//! configuration fault). This is the one place that retries; the client only
//! classifies. A message is acked only after WeChat accepted its notice or its
//! copy is confirmed in a retry or dead-letter queue.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{SecondsFormat, Utc};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lapin::options::BasicAckOptions;
use lapin::Acker;
use lapin::{BasicProperties, Channel};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::broker::{self, headers, ParkHeaders};
use crate::coalescer::Closed;
use crate::metrics::Metrics;
use crate::notice::Notice;
pub use crate::reason::Reason;
use crate::settings::Settings;
use crate::wechat::{CallResult, Outcome, WeChat};

/// Transient failures retried in memory (within seconds) before a notice's
/// messages are parked in a retry queue.
const IN_MEMORY_RETRIES: u32 = 3;
/// First in-memory backoff; it grows fourfold with jitter (≈0.2 s, 0.8 s, 3.2 s).
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// A token WeChat calls invalid is replaced and the call retried at most this often.
const TOKEN_RETRIES: u32 = 2;
/// How close to its rate slot a call stops sleeping and yields instead (the
/// timer's resolution is a millisecond).
const BUDGET_SPIN: Duration = Duration::from_micros(1500);

/// A `45011` pause is sat out in memory at most this often before parking.
const MINUTE_PAUSES: u32 = 2;

/// One unacked delivery and what is needed to park it elsewhere.
/// Dropping it without acking leaves it to the broker (redelivered later).
pub struct Pending {
    pub acker: Acker,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    /// Failed rounds so far (`x-notifier-attempts` of a message back from a retry queue).
    pub attempts: i64,
    pub first_failed_at: Option<String>,
    metrics: Arc<Metrics>,
}

impl Pending {
    pub fn new(delivery: lapin::message::Delivery, metrics: Arc<Metrics>) -> Self {
        metrics.unacked_deliveries.inc();
        Pending {
            attempts: broker::header_int(&delivery.properties, headers::ATTEMPTS).unwrap_or(0),
            first_failed_at: broker::header_str(&delivery.properties, headers::FIRST_FAILED_AT),
            acker: delivery.acker,
            body: delivery.data,
            properties: delivery.properties,
            metrics,
        }
    }

    /// Acks; `false` when lapin reports the ack as not done (channel gone).
    pub async fn ack(&self) -> bool {
        match self.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => true,
            Ok(false) => {
                warn!("ack not done (channel closed); the broker will redeliver");
                false
            }
            Err(e) => {
                warn!(error = %e, "ack failed; the broker will redeliver");
                false
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.metrics.unacked_deliveries.dec();
    }
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// What a session gives the dispatcher: where to park messages, and where to
/// report a configuration fault.
#[derive(Clone)]
pub struct SessionLink {
    pub channel: Channel,
    pub faults: mpsc::UnboundedSender<String>,
}

/// The last ticket of an assignee: its serial, and the signal its call is done.
type Tail = (u64, Option<oneshot::Receiver<()>>);

/// A window's place in its assignee's line (see `Dispatcher::ticket`).
pub struct Ticket {
    key: String,
    serial: u64,
    previous: Option<oneshot::Receiver<()>>,
    done: oneshot::Sender<()>,
}

/// Shared by every window this replica sends; outlives broker sessions so the
/// token cache and the rate budget survive a reconnect.
pub struct Dispatcher {
    settings: Arc<Settings>,
    wechat: WeChat,
    limiter: DefaultDirectRateLimiter,
    clock: DefaultClock,
    /// Calls take the budget one at a time, in the order they asked (a fair
    /// lock), so thousands of waiting windows do not all wake at every slot.
    budget_turn: tokio::sync::Mutex<()>,
    pause_until: Mutex<Option<Instant>>,
    /// Per assignee: the serial of the last ticket and the signal its call is done.
    assignee_tails: Mutex<HashMap<String, Tail>>,
    metrics: Arc<Metrics>,
}

/// The rate budget of contract section 3: even spacing at `rate`, `burst` back to back.
pub fn quota(rate_per_sec: f64, burst: u32) -> Quota {
    let period = Duration::from_secs_f64(1.0 / rate_per_sec).max(Duration::from_nanos(1));
    Quota::with_period(period)
        .expect("period is positive")
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("at least 1"))
}

impl Dispatcher {
    pub fn new(settings: Arc<Settings>, metrics: Arc<Metrics>) -> Self {
        let clock = DefaultClock::default();
        Dispatcher {
            wechat: WeChat::new(&settings, metrics.clone()),
            limiter: RateLimiter::direct_with_clock(
                quota(settings.rate_per_sec, settings.rate_burst),
                clock.clone(),
            ),
            clock,
            budget_turn: tokio::sync::Mutex::new(()),
            pause_until: Mutex::new(None),
            assignee_tails: Mutex::new(HashMap::new()),
            settings,
            metrics,
        }
    }

    /// Reaches WeChat without a notice (within the rate budget) to find configuration faults.
    ///
    /// # Errors
    /// The classified failure.
    pub async fn probe(&self) -> Result<(), CallResult> {
        self.wait_for_budget().await;
        self.wechat.probe().await
    }

    /// Takes this window's place in its assignee's line. Called in arrival
    /// order, synchronously, so an assignee's notices go out one at a time and
    /// in order, while different assignees' run concurrently.
    pub fn ticket(&self, closed: &Closed<Pending>) -> Ticket {
        let key = closed
            .events
            .first()
            .map(|e| e.assignee.user_id.clone())
            .unwrap_or_default();
        let (done, next) = oneshot::channel();
        let mut tails = self.assignee_tails.lock().expect("not poisoned");
        let serial = tails.get(&key).map_or(0, |(s, _)| s + 1);
        let previous = tails
            .insert(key.clone(), (serial, Some(next)))
            .and_then(|(_, rx)| rx);
        Ticket {
            key,
            serial,
            previous,
            done,
        }
    }

    /// Sends one closed window (after its assignee's previous one) and settles
    /// every delivery it holds.
    pub async fn deliver(&self, closed: Closed<Pending>, link: SessionLink, ticket: Ticket) {
        let Ticket {
            key,
            serial,
            previous,
            done,
        } = ticket;
        if let Some(previous) = previous {
            // Resolves when the previous call finished or its task was dropped.
            let _ = previous.await;
        }
        self.deliver_locked(closed, &link).await;
        drop(done);
        let mut tails = self.assignee_tails.lock().expect("not poisoned");
        if tails.get(&key).is_some_and(|(s, _)| *s == serial) {
            tails.remove(&key);
        }
    }

    async fn deliver_locked(&self, closed: Closed<Pending>, link: &SessionLink) {
        let Some(closed) = self.drop_expired(closed, link).await else {
            return;
        };
        let notice = closed.notice();
        let span = tracing::info_span!("notice", notice_id = %notice.notice_id, events = notice.customer_count);
        self.send_notice(&closed, &notice, link)
            .instrument(span)
            .await;
    }

    async fn send_notice(&self, closed: &Closed<Pending>, notice: &Notice, link: &SessionLink) {
        let (mut transient, mut token, mut minute) = (0u32, 0u32, 0u32);
        loop {
            self.wait_for_budget().await;
            let result = self.wechat.send(notice).await;
            debug!(outcome = result.outcome.as_str(), errcode = ?result.errcode, "WeChat answered");
            match result.outcome {
                Outcome::Delivered => {
                    let mut acked = 0;
                    for (_, p) in &closed.deliveries {
                        acked += usize::from(p.ack().await);
                    }
                    self.metrics
                        .notice_sent(notice.summary, notice.customer_count);
                    info!(
                        event_ids = ?notice.event_ids,
                        deliveries = closed.deliveries.len(),
                        acked,
                        "notice delivered"
                    );
                    return;
                }
                Outcome::TokenInvalid if token < TOKEN_RETRIES => token += 1,
                Outcome::MinuteQuota if minute < MINUTE_PAUSES => {
                    minute += 1;
                    self.pause(until_next_minute());
                }
                Outcome::Transient | Outcome::TokenInvalid | Outcome::MinuteQuota
                    if transient < IN_MEMORY_RETRIES =>
                {
                    let backoff = FIRST_BACKOFF * 4u32.pow(transient);
                    transient += 1;
                    tokio::time::sleep(jitter(backoff)).await;
                }
                Outcome::Transient | Outcome::TokenInvalid | Outcome::MinuteQuota => {
                    return self
                        .park(closed, notice, &result, Reason::RetriesExhausted, link)
                        .await;
                }
                Outcome::DailyQuota => {
                    self.pause(self.settings.retry_delays[0]);
                    return self
                        .park(closed, notice, &result, Reason::RetriesExhausted, link)
                        .await;
                }
                Outcome::FunctionFailed => {
                    return self
                        .park(closed, notice, &result, Reason::FunctionFailed, link)
                        .await;
                }
                Outcome::Rejected => {
                    return self
                        .dead_letter_all(closed, Reason::WechatRejected, &result, link)
                        .await;
                }
                Outcome::NoOpenid => {
                    return self
                        .dead_letter_all(closed, Reason::NoOpenid, &result, link)
                        .await;
                }
                Outcome::ConfigFault => {
                    warn!(detail = %result.detail, "configuration fault: stopping consumption");
                    let _ = link.faults.send(result.detail);
                    // The deliveries stay unacked; the session closes its channel and they return.
                    return;
                }
            }
        }
    }

    /// Waits out a quota pause, then takes one call from the rate budget.
    async fn wait_for_budget(&self) {
        let started = Instant::now();
        let _turn = self.budget_turn.lock().await;
        loop {
            let until = *self.pause_until.lock().expect("not poisoned");
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => break,
            }
        }
        // The timer wakes up to a millisecond late, and a late take shifts every
        // later slot (with a burst of 1 nothing absorbs it): sleep to just before
        // the slot, then yield until it opens.
        while let Err(not_until) = self.limiter.check() {
            let wait = not_until.wait_time_from(self.clock.now());
            if wait > BUDGET_SPIN {
                tokio::time::sleep(wait - BUDGET_SPIN).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        self.metrics
            .rate_limiter_wait
            .observe(started.elapsed().as_secs_f64());
    }

    /// Pauses every call of this replica for `d` (quota errors).
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut p = self.pause_until.lock().expect("not poisoned");
        if p.is_none_or(|cur| cur < until) {
            *p = Some(until);
        }
        warn!(seconds = d.as_secs_f64(), "pausing WeChat calls (quota)");
    }

    /// Dead-letters the events older than `NOTIFIER_MAX_AGE`; returns the rest.
    async fn drop_expired(
        &self,
        closed: Closed<Pending>,
        link: &SessionLink,
    ) -> Option<Closed<Pending>> {
        let max_age =
            chrono::Duration::from_std(self.settings.max_age).unwrap_or(chrono::Duration::MAX);
        let now = Utc::now();
        let expired: Vec<bool> = closed
            .events
            .iter()
            .map(|e| now.signed_duration_since(e.occurred_at) > max_age)
            .collect();
        if !expired.iter().any(|x| *x) {
            return Some(closed);
        }
        let Closed {
            events,
            deliveries,
            reason,
        } = closed;
        let mut kept_events = Vec::new();
        let mut new_index = vec![usize::MAX; events.len()];
        for (i, e) in events.into_iter().enumerate() {
            if !expired[i] {
                new_index[i] = kept_events.len();
                kept_events.push(e);
            }
        }
        let mut kept = Vec::new();
        let detail = format!(
            "the event is older than NOTIFIER_MAX_AGE ({})",
            crate::settings::format_duration(self.settings.max_age)
        );
        for (i, p) in deliveries {
            if expired[i] {
                let h = ParkHeaders {
                    reason: Some(Reason::Expired.as_str().into()),
                    detail: Some(detail.clone()),
                    errcode: None,
                    attempts: p.attempts,
                    first_failed_at: p.first_failed_at.clone().unwrap_or_else(now_rfc3339),
                };
                self.dead_letter(&p, Reason::Expired, &h, link).await;
            } else {
                kept.push((new_index[i], p));
            }
        }
        if kept_events.is_empty() {
            return None;
        }
        Some(Closed {
            events: kept_events,
            deliveries: kept,
            reason,
        })
    }

    /// Copies one message to the dead-letter queue with its headers, then acks it.
    /// If the copy is not confirmed, the original stays unacked.
    pub async fn dead_letter(
        &self,
        p: &Pending,
        reason: Reason,
        h: &ParkHeaders,
        link: &SessionLink,
    ) -> bool {
        let props = broker::with_park_headers(&p.properties, h);
        match broker::publish_confirmed(
            &link.channel,
            "",
            &self.settings.dead_queue,
            &p.body,
            props,
        )
        .await
        {
            Ok(()) => {
                self.metrics.dead_letter(reason, 1);
                p.ack().await
            }
            Err(e) => {
                warn!(error = %e, "dead-letter copy not confirmed; leaving the message unacked");
                false
            }
        }
    }

    async fn dead_letter_all(
        &self,
        closed: &Closed<Pending>,
        reason: Reason,
        result: &CallResult,
        link: &SessionLink,
    ) {
        warn!(reason = reason.as_str(), errcode = ?result.errcode, detail = %result.detail, "dead-lettering notice");
        let first_failed = now_rfc3339();
        for (_, p) in &closed.deliveries {
            let h = ParkHeaders {
                reason: Some(reason.as_str().into()),
                detail: Some(result.detail.clone()),
                errcode: result.errcode,
                attempts: p.attempts + 1,
                first_failed_at: p
                    .first_failed_at
                    .clone()
                    .unwrap_or_else(|| first_failed.clone()),
            };
            self.dead_letter(p, reason, &h, link).await;
        }
    }

    /// Parks each message in the retry queue of its next ladder step (or
    /// dead-letters it with `exhausted` past `NOTIFIER_MAX_ATTEMPTS`).
    async fn park(
        &self,
        closed: &Closed<Pending>,
        notice: &Notice,
        result: &CallResult,
        exhausted: Reason,
        link: &SessionLink,
    ) {
        let first_failed = now_rfc3339();
        let mut parked = 0;
        for (_, p) in &closed.deliveries {
            let attempts = p.attempts + 1;
            let h = ParkHeaders {
                reason: Some(exhausted.as_str().into()),
                detail: Some(result.detail.clone()),
                errcode: result.errcode,
                attempts,
                first_failed_at: p
                    .first_failed_at
                    .clone()
                    .unwrap_or_else(|| first_failed.clone()),
            };
            if attempts >= i64::from(self.settings.max_attempts) {
                self.dead_letter(p, exhausted, &h, link).await;
                continue;
            }
            let step = usize::try_from(attempts - 1)
                .unwrap_or(0)
                .min(self.settings.retry_delays.len() - 1);
            let queue = self.settings.retry_queue(self.settings.retry_delays[step]);
            let props = broker::with_park_headers(&p.properties, &h);
            match broker::publish_confirmed(&link.channel, "", &queue, &p.body, props).await {
                Ok(()) => {
                    if p.ack().await {
                        parked += 1;
                    }
                }
                Err(e) => {
                    warn!(error = %e, queue, "retry copy not confirmed; leaving the message unacked")
                }
            }
        }
        self.metrics.retry(result.outcome.as_str(), parked);
        info!(
            notice_id = %notice.notice_id,
            outcome = result.outcome.as_str(),
            errcode = ?result.errcode,
            parked,
            "notice not delivered; messages parked for retry"
        );
    }
}

/// ±25% jitter so replicas that failed together do not retry together.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() * 0.5)
}

/// How long until the next wall-clock minute starts (WeChat's minute quota resets then).
fn until_next_minute() -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let into = Duration::from_millis((now.as_millis() % 60_000) as u64);
    Duration::from_secs(60) - into + Duration::from_millis(50)
}
