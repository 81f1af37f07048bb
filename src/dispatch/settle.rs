//! Carrying out a settlement on the broker: ack, park a copy in a retry queue,
//! dead-letter a copy — each copy confirmed before its original is acked.
//! A copy that fails (nacked, returned, not confirmed in time, broker gone)
//! releases its original back to the work queue; nothing is left pinned.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tracing::{info, warn};

use super::policy::{is_expired, Park, Rules};
use crate::broker::{with_park_headers, BrokerError, ParkHeaders, Pending, Publisher};
use crate::coalescer::Closed;
use crate::ledger::store::HeldRow;
use crate::metrics::Metrics;
use crate::notice::Notice;
use crate::reason::Reason;
use crate::settings::{format_duration, Settings};
use crate::wechat::CallResult;

/// How long a message whose copy failed is held before it is released: the
/// copy's failure (a deleted retry queue, a broker alarm) is rarely gone at
/// once, and an immediate release would spin the message through the queue.
const RELEASE_DELAY: Duration = Duration::from_secs(1);

/// The broker side of settling deliveries.
pub struct Settler {
    publisher: Publisher,
    rules: Rules,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
}

/// `props` with `traceparent` naming `tc` (other headers kept; a stale
/// `tracestate` goes with the CRM's span it described only when ours replaces it).
fn with_traceparent(
    props: lapin::BasicProperties,
    tc: &crate::trace::Ctx,
) -> lapin::BasicProperties {
    let mut t = props.headers().clone().unwrap_or_default();
    t.insert(
        crate::trace::TRACEPARENT.into(),
        lapin::types::AMQPValue::LongString(tc.header().into()),
    );
    props.with_headers(t)
}

/// What a log line says about one delivery.
fn id_of<'a>(closed: &'a Closed<Pending>, index: usize, p: &'a Pending) -> &'a str {
    closed
        .events
        .get(index)
        .map(|e| e.event_id.as_str())
        .or_else(|| p.message_id())
        .unwrap_or("-")
}

impl Settler {
    pub fn new(publisher: Publisher, settings: Arc<Settings>, metrics: Arc<Metrics>) -> Self {
        Settler {
            publisher,
            rules: Rules::from_settings(&settings),
            settings,
            metrics,
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Closes the publishing connection.
    pub async fn close(&self) {
        self.publisher.close().await;
    }

    /// The notice was accepted: ack every delivery that carried one of its events.
    pub async fn ack_all(&self, closed: &mut Closed<Pending>, notice: &Notice) {
        let mut acked = 0;
        for (_, p) in &mut closed.deliveries {
            acked += usize::from(p.ack());
        }
        self.metrics
            .notice_sent(notice.summary, notice.customer_count);
        info!(
            notice_id = %notice.notice_id,
            assignee = %notice.assignee.user_id,
            event_ids = %notice.event_ids.join(","),
            deliveries = closed.deliveries.len(),
            acked,
            "notice delivered"
        );
    }

    /// Publishes a copy of `p` to `queue`, then acks `p`.
    ///
    /// # Errors
    /// The copy is not safe (the original is left unacked for the caller to release).
    async fn copy_then_ack(
        &self,
        p: &mut Pending,
        queue: &str,
        h: &ParkHeaders,
    ) -> Result<bool, BrokerError> {
        let mut props = with_park_headers(&p.properties(), h);
        if let Some(tc) = &p.trace {
            props = with_traceparent(props, tc);
        }
        self.publisher.publish("", queue, &p.body, props).await?;
        Ok(p.ack())
    }

    /// Returns every delivery not yet settled to the work queue, after a
    /// pause: a copy's failure (a deleted queue, a broker alarm) is rarely
    /// gone at once, and an immediate release would spin the messages.
    async fn release_rest(&self, deliveries: &mut [(usize, Pending)]) {
        tokio::time::sleep(RELEASE_DELAY).await;
        for (_, p) in deliveries {
            p.release().await;
        }
    }

    /// An event that breaks the schema: dead-lettered `invalid_event` at once.
    pub async fn dead_letter_invalid(&self, mut p: Pending, detail: String) {
        let id = p.message_id().unwrap_or("-").to_string();
        let h = ParkHeaders::new(
            Reason::InvalidEvent,
            detail,
            None,
            p.attempts,
            p.first_failed_at.as_deref(),
            Utc::now(),
        );
        match self
            .copy_then_ack(&mut p, &self.settings.dead_queue, &h)
            .await
        {
            Ok(_) => {
                self.metrics.dead_letter(Reason::InvalidEvent, 1);
                warn!(message_id = %id, detail = %h.detail, "invalid event dead-lettered");
            }
            Err(e) => {
                warn!(message_id = %id, error = %e, "dead-letter copy not confirmed; returning the message to the queue");
                self.release_rest(std::slice::from_mut(&mut (0, p))).await;
            }
        }
    }

    /// Moves every delivery of a window to a queue chosen per delivery: one
    /// copy per distinct event (a duplicate delivery is acked with its
    /// event's copy). At the first copy that fails, the rest of the window is
    /// not tried and every unsettled delivery is released together.
    /// Returns the event ids moved, with where they went.
    async fn move_all(
        &self,
        closed: &mut Closed<Pending>,
        mut route: impl FnMut(&Pending) -> (String, ParkHeaders),
    ) -> Vec<(String, String, ParkHeaders)> {
        let mut deliveries = std::mem::take(&mut closed.deliveries);
        let mut moved = Vec::new();
        // Per event: whether its copy is safe.
        let mut copied: HashMap<usize, bool> = HashMap::new();
        let mut failed = false;
        for (i, p) in &mut deliveries {
            let id = id_of(closed, *i, p).to_string();
            match copied.get(i) {
                Some(true) => {
                    p.ack();
                    continue;
                }
                Some(false) => continue,
                None => {}
            }
            let (queue, h) = route(p);
            match self.copy_then_ack(p, &queue, &h).await {
                Ok(_) => {
                    copied.insert(*i, true);
                    moved.push((id, queue, h));
                }
                Err(e) => {
                    warn!(event_id = %id, queue = %queue, error = %e, "copy not confirmed; returning the window's messages to the queue");
                    copied.insert(*i, false);
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.release_rest(&mut deliveries).await;
        }
        closed.deliveries = deliveries;
        moved
    }

    /// Dead-letters every delivery of a notice WeChat refused for good.
    pub async fn dead_letter_all(
        &self,
        closed: &mut Closed<Pending>,
        notice: &Notice,
        reason: Reason,
        result: &CallResult,
    ) {
        let now = Utc::now();
        let dead_queue = self.settings.dead_queue.clone();
        let moved = self
            .move_all(closed, |p| {
                let h = ParkHeaders::new(
                    reason,
                    result.detail.clone(),
                    result.errcode,
                    p.attempts.saturating_add(1),
                    p.first_failed_at.as_deref(),
                    now,
                );
                (dead_queue.clone(), h)
            })
            .await;
        self.metrics.dead_letter(reason, moved.len() as u64);
        let ids: Vec<&str> = moved.iter().map(|(id, _, _)| id.as_str()).collect();
        warn!(
            notice_id = %notice.notice_id,
            assignee = %notice.assignee.user_id,
            reason = reason.as_str(),
            errcode = result.errcode.unwrap_or_default(),
            detail = %result.detail,
            event_ids = %ids.join(","),
            "notice dead-lettered"
        );
    }

    /// Parks each delivery in the retry queue of its next ladder step, or
    /// dead-letters it with `exhausted` past `NOTIFIER_MAX_ATTEMPTS`.
    pub async fn park_all(
        &self,
        closed: &mut Closed<Pending>,
        notice: &Notice,
        result: &CallResult,
        exhausted: Reason,
    ) {
        let now = Utc::now();
        let moved = self
            .move_all(closed, |p| {
                let step = self.rules.ladder_step(p.attempts);
                let (queue, attempts) = match step {
                    Park::Retry { delay, attempts } => (self.settings.retry_queue(delay), attempts),
                    Park::Exhausted { attempts } => (self.settings.dead_queue.clone(), attempts),
                };
                let h = ParkHeaders::new(
                    exhausted,
                    result.detail.clone(),
                    result.errcode,
                    attempts,
                    p.first_failed_at.as_deref(),
                    now,
                );
                (queue, h)
            })
            .await;
        for (id, queue, h) in moved {
            if queue == self.settings.dead_queue {
                self.metrics.dead_letter(exhausted, 1);
                warn!(
                    notice_id = %notice.notice_id,
                    event_id = %id,
                    assignee = %notice.assignee.user_id,
                    reason = exhausted.as_str(),
                    attempts = h.attempts,
                    cause = %result.detail,
                    "retries exhausted: dead-lettered"
                );
                continue;
            }
            self.metrics.retry(result.outcome.as_str(), 1);
            let delay = self.rules.ladder_step(h.attempts.saturating_sub(1));
            let next = match delay {
                Park::Retry { delay, .. } => chrono::Duration::from_std(delay)
                    .ok()
                    .and_then(|d| now.checked_add_signed(d))
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                Park::Exhausted { .. } => None,
            };
            info!(
                notice_id = %notice.notice_id,
                event_id = %id,
                assignee = %notice.assignee.user_id,
                queue = %queue,
                attempt = h.attempts,
                next_try = next.as_deref().unwrap_or("-"),
                cause = %result.detail,
                "parked for retry"
            );
        }
    }

    /// Every call is paused (a quota) for `left` more, too long to hold the
    /// window's deliveries: parks each in a retry queue (`rung_for_pause`)
    /// without counting a failed attempt, so it comes back near the pause's
    /// end instead of being held past the broker's `consumer_timeout`.
    pub async fn park_for_pause(
        &self,
        closed: &mut Closed<Pending>,
        notice: &Notice,
        left: Duration,
        errcode: i64,
    ) {
        let delay = self.rules.rung_for_pause(left);
        let detail = format!(
            "every WeChat call is paused for another {} s (quota, errcode {errcode}); not a failed attempt",
            left.as_secs()
        );
        self.park_unattempted(closed, notice, delay, detail, Some(errcode), "quota_pause")
            .await;
    }

    /// The grant ledger cannot be read or written: parks every delivery of
    /// the window in the first retry queue without counting a failed
    /// attempt (`retries_total{reason="ledger"}`); `detail` says why.
    pub async fn park_for_ledger(
        &self,
        closed: &mut Closed<Pending>,
        notice: &Notice,
        detail: &str,
        errcode: Option<i64>,
    ) {
        let delay = self.rules.rung(0);
        self.park_unattempted(closed, notice, delay, detail.into(), errcode, "ledger")
            .await;
    }

    /// Parks every delivery of a window in the retry queue of `delay`
    /// without counting a failed attempt (a quota pause, the grant ledger
    /// unavailable): the messages come back, their attempts unchanged.
    /// Counted in `retries_total` under `why`.
    async fn park_unattempted(
        &self,
        closed: &mut Closed<Pending>,
        notice: &Notice,
        delay: Duration,
        detail: String,
        errcode: Option<i64>,
        why: &'static str,
    ) -> usize {
        let queue = self.settings.retry_queue(delay);
        let moved = self
            .move_unattempted(closed, &queue, &detail, errcode, why)
            .await;
        let ids: Vec<&str> = moved.iter().map(|(id, _, _)| id.as_str()).collect();
        info!(
            notice_id = %notice.notice_id,
            assignee = %notice.assignee.user_id,
            queue = %queue,
            %detail,
            event_ids = %ids.join(","),
            "parked, not as a failed attempt"
        );
        moved.len()
    }

    /// Moves every delivery of `closed` to `queue` with its attempts
    /// unchanged, counted in `retries_total` under `why`.
    async fn move_unattempted(
        &self,
        closed: &mut Closed<Pending>,
        queue: &str,
        detail: &str,
        errcode: Option<i64>,
        why: &'static str,
    ) -> Vec<(String, String, ParkHeaders)> {
        let now = Utc::now();
        let moved = self
            .move_all(closed, |p| {
                let h = ParkHeaders::new(
                    Reason::RetriesExhausted,
                    detail.to_string(),
                    errcode,
                    p.attempts,
                    p.first_failed_at.as_deref(),
                    now,
                );
                (queue.to_string(), h)
            })
            .await;
        self.metrics.retry(why, moved.len() as u64);
        moved
    }

    /// Acks every delivery of a window whose events the grant ledger now
    /// holds (written first: never acked before).
    pub fn ack_held(&self, closed: &mut Closed<Pending>) {
        for (_, p) in &mut closed.deliveries {
            p.ack();
        }
    }

    /// Parks one delivery (a subscription event) in a retry queue without
    /// counting a failed attempt (the grant ledger unavailable: counted in
    /// `retries_total` as `ledger`).
    pub async fn park_one_unattempted(&self, p: Pending, delay: Duration, detail: String) {
        let queue = self.settings.retry_queue(delay);
        self.move_unattempted(&mut single(p), &queue, &detail, None, "ledger")
            .await;
    }

    /// Parks one delivery (an accept whose release failed for now) on its
    /// next ladder step, as a failed attempt; past the ladder it is
    /// dead-lettered `retries_exhausted`.
    pub async fn park_one(&self, p: Pending, detail: String) {
        let mut one = single(p);
        let now = Utc::now();
        self.move_all(&mut one, |p| {
            let (queue, attempts) = match self.rules.ladder_step(p.attempts) {
                Park::Retry { delay, attempts } => (self.settings.retry_queue(delay), attempts),
                Park::Exhausted { attempts } => (self.settings.dead_queue.clone(), attempts),
            };
            let h = ParkHeaders::new(
                Reason::RetriesExhausted,
                detail.clone(),
                None,
                attempts,
                p.first_failed_at.as_deref(),
                now,
            );
            (queue, h)
        })
        .await;
    }

    /// Dead-letters one delivery with `reason` at once (as an invalid event is).
    pub async fn dead_letter_one(&self, p: Pending, reason: Reason, detail: String) {
        let mut one = single(p);
        let now = Utc::now();
        let dead_queue = self.settings.dead_queue.clone();
        let moved = self
            .move_all(&mut one, |p| {
                let h = ParkHeaders::new(
                    reason,
                    detail.clone(),
                    None,
                    p.attempts,
                    p.first_failed_at.as_deref(),
                    now,
                );
                (dead_queue.clone(), h)
            })
            .await;
        self.metrics.dead_letter(reason, moved.len() as u64);
        for (id, _, _) in moved {
            warn!(message_id = %id, reason = reason.as_str(), %detail, "dead-lettered");
        }
    }

    /// Dead-letters a held event from the body the ledger kept (the original
    /// message is long acked): `true` once the copy is confirmed.
    pub async fn dead_letter_body(
        &self,
        row: &HeldRow,
        reason: Reason,
        errcode: Option<i64>,
        detail: &str,
    ) -> bool {
        let h = ParkHeaders::new(
            reason,
            detail,
            errcode,
            i64::from(row.attempts),
            None,
            Utc::now(),
        );
        let mut props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(row.event_id.as_str().into())
            .with_delivery_mode(2);
        if let Some(tp) = &row.traceparent {
            let mut t = lapin::types::FieldTable::default();
            t.insert(
                "traceparent".into(),
                lapin::types::AMQPValue::LongString(tp.as_str().into()),
            );
            props = props.with_headers(t);
        }
        let props = with_park_headers(&props, &h);
        match self
            .publisher
            .publish("", &self.settings.dead_queue, &row.body, props)
            .await
        {
            Ok(()) => {
                self.metrics.dead_letter(reason, 1);
                warn!(event_id = %row.event_id, reason = reason.as_str(), %detail, "held event dead-lettered");
                true
            }
            Err(e) => {
                warn!(event_id = %row.event_id, error = %e, "dead-letter copy of a held event not confirmed; it stays held");
                false
            }
        }
    }

    /// Publishes a signal to the CRM (persistent JSON, confirmed): `true`
    /// once the broker confirmed it.
    pub async fn publish_signal(
        &self,
        exchange: &str,
        key: &str,
        body: &serde_json::Value,
    ) -> bool {
        let mut props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        // The span of the notice, hold or release that raised it.
        if let Some(tc) = crate::trace::current() {
            props = with_traceparent(props, &tc);
        }
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        match self.publisher.publish(exchange, key, &bytes, props).await {
            Ok(()) => true,
            // The broker took it, but no queue of the CRM is bound to the
            // key: publishing it again would not change that.
            Err(BrokerError::Unroutable(_)) => {
                info!(
                    signal = key,
                    "signal published, but no queue is bound to it (the CRM does not listen)"
                );
                true
            }
            Err(e) => {
                warn!(signal = key, error = %e, "signal not published");
                false
            }
        }
    }

    /// Dead-letters the events older than `NOTIFIER_MAX_AGE` and takes them
    /// out of the window.
    pub async fn drop_expired(&self, closed: &mut Closed<Pending>) -> Expiry {
        let now = Utc::now();
        let max_age = self.settings.max_age;
        let expired: Vec<bool> = closed
            .events
            .iter()
            .enumerate()
            // Held events wait for an accept: the max age does not apply.
            .map(|(i, e)| i >= closed.held && is_expired(e.occurred_at, now, max_age))
            .collect();
        if !expired.contains(&true) {
            return Expiry::Nothing;
        }
        let detail = format!(
            "the event is older than NOTIFIER_MAX_AGE ({})",
            format_duration(max_age)
        );
        // The expired part as a window of its own, moved to the dead-letter queue.
        let mut old = closed.split_off(&expired);
        let dead_queue = self.settings.dead_queue.clone();
        let moved = self
            .move_all(&mut old, |p| {
                let h = ParkHeaders::new(
                    Reason::Expired,
                    detail.clone(),
                    None,
                    p.attempts,
                    p.first_failed_at.as_deref(),
                    now,
                );
                (dead_queue.clone(), h)
            })
            .await;
        self.metrics
            .dead_letter(Reason::Expired, moved.len() as u64);
        let ids: Vec<&str> = moved.iter().map(|(id, _, _)| id.as_str()).collect();
        warn!(event_ids = %ids.join(","), %detail, "expired events dead-lettered");
        if closed.events.is_empty() {
            Expiry::All
        } else {
            Expiry::Some
        }
    }
}

/// One delivery as a window of its own (no events: logs name its message id).
fn single(p: Pending) -> Closed<Pending> {
    Closed {
        events: Vec::new(),
        deliveries: vec![(0, p)],
        reason: crate::coalescer::CloseReason::Release,
        held: 0,
    }
}

/// What `drop_expired` took out of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Nothing,
    Some,
    All,
}
