//! Carrying out a settlement on the broker: ack, park a copy in a retry queue,
//! dead-letter a copy — each copy confirmed before its original is acked.
//! A copy that fails (nacked, returned, not confirmed in time, broker gone)
//! releases its original back to the work queue; nothing is left pinned.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tracing::{info, warn};

use super::policy::{is_expired, Park, Rules};
use crate::broker::{with_park_headers, ParkHeaders, Pending, Publisher};
use crate::coalescer::Closed;
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
            acked += usize::from(p.ack().await);
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

    /// Copies one message to the dead-letter queue, then acks it. A copy that
    /// is not safe releases the original.
    async fn dead_letter(&self, p: &mut Pending, h: &ParkHeaders, id: &str) -> bool {
        let props = with_park_headers(&p.properties(), h);
        match self
            .publisher
            .publish("", &self.settings.dead_queue, &p.body, props)
            .await
        {
            Ok(()) => {
                self.metrics.dead_letter(h.reason, 1);
                p.ack().await
            }
            Err(e) => {
                warn!(event_id = %id, error = %e, "dead-letter copy not confirmed; returning the message to the queue");
                self.release(p).await;
                false
            }
        }
    }

    /// Returns a message whose copy failed to the work queue, after a pause.
    async fn release(&self, p: &mut Pending) {
        tokio::time::sleep(RELEASE_DELAY).await;
        p.release().await;
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
        if self.dead_letter(&mut p, &h, &id).await {
            warn!(message_id = %id, detail = %h.detail, "invalid event dead-lettered");
        }
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
        let mut done = Vec::new();
        let mut deliveries = std::mem::take(&mut closed.deliveries);
        for (i, p) in &mut deliveries {
            let h = ParkHeaders::new(
                reason,
                result.detail.clone(),
                result.errcode,
                p.attempts.saturating_add(1),
                p.first_failed_at.as_deref(),
                now,
            );
            let id = id_of(closed, *i, p).to_string();
            if self.dead_letter(p, &h, &id).await {
                done.push(id);
            }
        }
        closed.deliveries = deliveries;
        warn!(
            notice_id = %notice.notice_id,
            assignee = %notice.assignee.user_id,
            reason = reason.as_str(),
            errcode = result.errcode.unwrap_or_default(),
            detail = %result.detail,
            event_ids = %done.join(","),
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
        let mut deliveries = std::mem::take(&mut closed.deliveries);
        for (i, p) in &mut deliveries {
            let id = id_of(closed, *i, p).to_string();
            let step = self.rules.ladder_step(p.attempts);
            let attempts = match step {
                Park::Retry { attempts, .. } | Park::Exhausted { attempts } => attempts,
            };
            let h = ParkHeaders::new(
                exhausted,
                result.detail.clone(),
                result.errcode,
                attempts,
                p.first_failed_at.as_deref(),
                now,
            );
            let Park::Retry { delay, .. } = step else {
                if self.dead_letter(p, &h, &id).await {
                    warn!(
                        notice_id = %notice.notice_id,
                        event_id = %id,
                        assignee = %notice.assignee.user_id,
                        reason = exhausted.as_str(),
                        attempts,
                        cause = %result.detail,
                        "retries exhausted: dead-lettered"
                    );
                }
                continue;
            };
            let queue = self.settings.retry_queue(delay);
            let props = with_park_headers(&p.properties(), &h);
            match self.publisher.publish("", &queue, &p.body, props).await {
                Ok(()) => {
                    if p.ack().await {
                        self.metrics.retry(result.outcome.as_str(), 1);
                        let next = now + chrono::Duration::from_std(delay).unwrap_or_default();
                        info!(
                            notice_id = %notice.notice_id,
                            event_id = %id,
                            assignee = %notice.assignee.user_id,
                            queue = %queue,
                            attempt = attempts,
                            next_try = %next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            cause = %result.detail,
                            "parked for retry"
                        );
                    }
                }
                Err(e) => {
                    warn!(event_id = %id, queue = %queue, error = %e, "retry copy not confirmed; returning the message to the queue");
                    self.release(p).await;
                }
            }
        }
        closed.deliveries = deliveries;
    }

    /// Dead-letters the events older than `NOTIFIER_MAX_AGE`; returns the
    /// window without them (`None` when nothing is left to send).
    pub async fn drop_expired(&self, closed: Closed<Pending>) -> Option<Closed<Pending>> {
        let now = Utc::now();
        let max_age = self.settings.max_age;
        let expired: Vec<bool> = closed
            .events
            .iter()
            .map(|e| is_expired(e.occurred_at, now, max_age))
            .collect();
        if !expired.contains(&true) {
            return Some(closed);
        }
        let Closed {
            events,
            deliveries,
            reason,
        } = closed;
        let detail = format!(
            "the event is older than NOTIFIER_MAX_AGE ({})",
            format_duration(max_age)
        );
        let mut new_index = vec![usize::MAX; events.len()];
        let mut kept_events = Vec::new();
        let mut ids = Vec::new();
        for (i, e) in events.into_iter().enumerate() {
            if expired[i] {
                ids.push(e.event_id);
            } else {
                new_index[i] = kept_events.len();
                kept_events.push(e);
            }
        }
        let mut kept = Vec::new();
        for (i, mut p) in deliveries {
            if expired[i] {
                let h = ParkHeaders::new(
                    Reason::Expired,
                    detail.clone(),
                    None,
                    p.attempts,
                    p.first_failed_at.as_deref(),
                    now,
                );
                let id = p.message_id().unwrap_or("-").to_string();
                self.dead_letter(&mut p, &h, &id).await;
            } else {
                kept.push((new_index[i], p));
            }
        }
        warn!(event_ids = %ids.join(","), %detail, "expired events dead-lettered");
        if kept_events.is_empty() {
            return None;
        }
        Some(Closed {
            events: kept_events,
            deliveries: kept,
            reason,
        })
    }
}
