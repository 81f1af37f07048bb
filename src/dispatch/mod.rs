//! From a closed window to settled messages. This is the one place that
//! retries; the WeChat client only classifies. The loop here only carries out
//! the steps the policy decides:
//!
//! - [`policy`]: outcome + what the notice went through + now → one step (pure);
//! - [`budget`]: the fleet-wide rate, quota pauses, a held configuration fault;
//! - [`lanes`]: one call in flight per assignee, in arrival order;
//! - [`settle`]: ack, park or dead-letter on the broker, copies confirmed first.
//!
//! A message is acked only after WeChat accepted its notice or its copy is
//! confirmed in a retry or dead-letter queue; otherwise it is held or released.

pub mod budget;
mod held;
pub mod lanes;
pub mod policy;
pub mod settle;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use tokio::time::Instant;

use tracing::{debug, info, warn, Instrument};

use crate::broker::{Pending, Publisher};
use crate::coalescer::Closed;
use crate::event::AssignmentEvent;
use crate::http::Health;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::notice::Notice;
pub use crate::reason::Reason;
use crate::settings::{Secret, Settings};
use crate::wechat::{CallResult, Outcome, WeChat};
pub use budget::quota;
use budget::{Budget, ProbeTurn, QuotaKind, Turn};
use held::{LedgerCtx, OnHold};
use lanes::{Lanes, Ticket};
use policy::{is_expired, Step, Tries};
use settle::{Expiry, Settler};

/// Shared by every window this replica sends; outlives broker sessions so the
/// token cache, the rate budget and a held fault survive a reconnect.
pub struct Dispatcher {
    settings: Arc<Settings>,
    wechat: WeChat,
    budget: Budget,
    lanes: Lanes,
    /// Places for the calls under way (`NOTIFIER_MAX_IN_FLIGHT`): each call
    /// in flight needs a connection of its own, and so a TLS handshake with
    /// WeChat. Unbounded, a burst of windows opened one per window (480 in
    /// the drain benchmark), adding CPU and no notice a second: 64 calls of
    /// 300 ms each are 200 calls a second, twenty times the default rate.
    in_flight: Arc<tokio::sync::Semaphore>,
    settle: Settler,
    /// The events of the notice whose real send found the configuration
    /// fault being held. The start-up probe cannot see such a fault, so a new
    /// session sends their notice again before it consumes (and does not
    /// consume while that fails: the messages rest in the queue, nothing
    /// churns). Kept as events, not as a notice, so the re-send leaves out
    /// those past `NOTIFIER_MAX_AGE` when it is made (unless the grant
    /// ledger marked them with the notice's id: see `held_notice_now`).
    held_events: Mutex<Option<HeldNotice>>,
    /// The held fault was found on a real send (not by the start-up probe):
    /// only a real notice's retry ends it, never a probe, which cannot see it.
    fault_from_send: AtomicBool,
    /// The events a re-sent held notice delivered, each until `NOTIFIER_MAX_AGE`
    /// after the re-send: every delivery of them that comes back from the
    /// queue (the CRM may have published one twice) is acked without another
    /// notice, so an accepted re-send settles exactly the events it carried.
    resent: Mutex<HashMap<String, Instant>>,
    /// The grant ledger (contract section 8), when `NOTIFIER_LEDGER_URL` is set.
    ledger: Option<Arc<Ledger>>,
    metrics: Arc<Metrics>,
    /// Itself, for the ledger's background work (a decrement retried, a
    /// signal published) that outlives the notice that started it.
    me: Weak<Dispatcher>,
}

/// The notice whose send found the configuration fault being held, as a
/// later session sends it again.
struct HeldNotice {
    events: Vec<AssignmentEvent>,
    /// With the grant ledger: its user, and the claim its held events were
    /// taken under (the re-send then carries exactly the claimed ids, and an
    /// accepted re-send is recorded in the ledger as any accepted notice is).
    ledger: Option<held::HeldClaim>,
}

/// How a notice's loop ended: what the grant ledger does next with the
/// held events the notice claimed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ended {
    /// WeChat accepted it; its deliveries are acked.
    Accepted,
    /// Held in the ledger; its deliveries are acked.
    Held,
    /// Parked in a retry queue (or released to the queue): it comes back.
    Parked,
    /// The grant ledger did not answer: parked, not as a failed attempt (a
    /// release with nothing else to send was not tried at all).
    ParkedForLedger,
    /// Dead-lettered for good with this reason.
    DeadLettered(Reason, CallResult),
    /// Nothing was left to send (every event expired).
    Gone,
}

/// One pass of a notice's loop, before its outcome is judged.
enum Attempt {
    /// Decided without WeChat (no openid in the direct mode): proves nothing
    /// about the settings.
    Local(CallResult),
    /// WeChat's answer (or the token fetch's failure).
    Answered(CallResult),
    /// This window's notice became the one retried during a held fault.
    Probe(ProbeTurn),
    /// Go round again (a new rate slot).
    Again,
    /// Nothing left to send (expired, or parked during a quota pause).
    Done,
    /// Parked, not as a failed attempt: events expired and the ledger's
    /// claim could not follow the notice's new id.
    ParkedForLedger,
}

/// Who has the work queue, as the broker answers right before (and again
/// right after) a held notice's re-send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOwner {
    /// Another replica consumes it: the broker gave it the held notice's events.
    Others,
    /// Nobody consumes it: the held events wait in it for this replica.
    Nobody,
    /// It was gone (deleted) and is declared again: the held notice's
    /// messages went with it.
    Recreated,
    /// The broker did not answer: not "nobody".
    Unknown,
}

impl Dispatcher {
    /// `name` names the publishing connection (copies to retry and dead-letter queues).
    pub fn new(
        settings: Arc<Settings>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        ledger: Option<Arc<Ledger>>,
        name: &str,
    ) -> Arc<Self> {
        let publisher = Publisher::new(settings.amqp_urls.clone(), format!("{name}-publish"));
        Arc::new_cyclic(|me| Dispatcher {
            wechat: WeChat::new(&settings, metrics.clone()),
            budget: Budget::new(
                settings.rate_per_sec,
                settings.rate_burst,
                health,
                metrics.clone(),
            ),
            lanes: Lanes::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(settings.max_in_flight)),
            settle: Settler::new(publisher, settings.clone(), metrics.clone()),
            held_events: Mutex::new(None),
            fault_from_send: AtomicBool::new(false),
            resent: Mutex::new(HashMap::new()),
            ledger,
            metrics,
            me: me.clone(),
            settings,
        })
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This dispatcher, shared (it lives in an `Arc` from `new` on).
    fn me(&self) -> Arc<Dispatcher> {
        self.me.upgrade().expect("a dispatcher lives in its Arc")
    }

    /// The grant ledger, when it is on.
    pub fn ledger(&self) -> Option<&Arc<Ledger>> {
        self.ledger.as_ref()
    }

    /// Before consuming: reaches WeChat without a notice (within the rate
    /// budget) to find configuration faults. A fault the probe finds is held
    /// until a probe passes; while it is held this returns `Err` and the
    /// caller does not consume. A fault found on a real send is one the probe
    /// cannot see: a passing probe never ends it (only a real notice's retry
    /// does: the held notice's re-send, or a window's retry).
    ///
    /// # Errors
    /// The classified failure; the caller decides which outcomes matter.
    /// `owner` asks the broker who has the work queue now (see [`QueueOwner`]);
    /// it is awaited only while a fault found on a send is held.
    pub async fn check_before_consuming<F, Fut>(&self, owner: F) -> Result<(), CallResult>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = QueueOwner>,
    {
        // The token before the rate slot (no slot held during a fetch).
        let token = self.wechat.token().await;
        let result = match &token {
            Ok(token) => {
                self.budget.take_unheld().await;
                match self.token_after_wait(token).await {
                    Ok(token) => self.wechat.probe_with(&token).await,
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e.clone()),
        };
        if let (Ok(()), Ok(token)) = (&result, &token) {
            if self.fault_from_send.load(Ordering::SeqCst) {
                return self.retry_held(token, &owner).await;
            }
        }
        match &result {
            Ok(()) => self.budget.release(),
            Err(e) if e.outcome == Outcome::ConfigFault => drop(self.budget.hold(&e.detail)),
            Err(e) => self.pause_on_quota(e.outcome),
        }
        result
    }

    /// A fault found on a real send is held and the probe passed: the held
    /// notice is sent again (what is left of it: expiry is judged now, when
    /// it would be sent), only while no other replica has its events. `Ok`
    /// lets the session consume: the fault was proved gone, or this replica
    /// is not the one that has the events, or there is nothing left to
    /// re-send (then the fault stays held, and one of the session's windows
    /// becomes the notice retried: calls resume only when a real notice's
    /// retry is accepted).
    async fn retry_held<F, Fut>(&self, token: &Secret, owner: &F) -> Result<(), CallResult>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = QueueOwner>,
    {
        // The re-send's rate slot first (it may wait out a pause): who has
        // the queue is asked after it, right before the call.
        if self.holds_notice() {
            self.budget.take_unheld().await;
        }
        match owner().await {
            QueueOwner::Others => {
                self.not_the_active_one();
                return Ok(());
            }
            // Nothing to re-send: consuming sends nothing beside another
            // replica (a window waits for the fault held, or this replica
            // is a standby and gets none).
            QueueOwner::Unknown if !self.holds_notice() => return Ok(()),
            // Re-sending could send the events beside the replica that has
            // them: the notice stays held, asked again after the retry delay.
            QueueOwner::Unknown => {
                let unknown = "whether another replica consumes the queue is unknown; \
                               the held notice waits";
                return Err(CallResult::transient(unknown));
            }
            QueueOwner::Recreated => {
                self.forget_held_notice("the work queue was deleted, and its messages with it");
                return Ok(());
            }
            QueueOwner::Nobody => {}
        }
        let Some((notice, claim)) = self.held_notice_now() else {
            return Ok(());
        };
        let sent = match self.token_after_wait(token).await {
            Ok(token) => self.resend(&notice, &token).await,
            Err(e) => e,
        };
        // Accepted: the ledger learns it first, whoever has the queue now
        // (the accept or window that comes back, here or on another
        // replica, then finds the events settled instead of re-sending them).
        if sent.outcome == Outcome::Delivered {
            if let Some(claim) = claim {
                self.resent_in_ledger(claim, &notice.notice_id).await;
            }
        }
        // A replica that took the queue during the call has the events and
        // sends them itself: the re-send's effect is dropped (nothing acked
        // for it here, no fault released or held by its answer). With the
        // ledger, a notice it sends again for the claimed events carries
        // the same ids.
        match owner().await {
            QueueOwner::Others => {
                self.not_the_active_one();
                Ok(())
            }
            // Deleted during the call: its answer still tells about the
            // settings, but the notice is not sent again for messages that
            // went with the queue.
            QueueOwner::Recreated => {
                let settled = self.settle_resend(&notice, sent);
                self.forget_held_notice("the work queue was deleted, and its messages with it");
                settled
            }
            QueueOwner::Nobody | QueueOwner::Unknown => self.settle_resend(&notice, sent),
        }
    }

    /// Carries out the re-send's answer. Only an answer that proves the
    /// settings ends the fault; the fault again keeps it held (`Err`); any
    /// other answer (a 5xx, a timeout, a quota, the function throwing on this
    /// notice) proves nothing: the fault stays held, but this notice no
    /// longer keeps the replica from consuming. One of the session's windows
    /// becomes the notice retried, with the ladder (so a notice failing for
    /// its own reasons is parked, not retried here forever).
    fn settle_resend(&self, notice: &Notice, sent: CallResult) -> Result<(), CallResult> {
        if sent.outcome == Outcome::ConfigFault {
            drop(self.budget.hold(&sent.detail));
            return Err(sent);
        }
        if !sent.outcome.proves_settings() {
            self.pause_on_quota(sent.outcome);
            warn!(detail = %sent.detail, "the held notice's retry proved nothing; consuming with the fault held");
            *self.held_events.lock().expect("not poisoned") = None;
            return Ok(());
        }
        if sent.outcome == Outcome::Delivered {
            info!(
                notice_id = %notice.notice_id,
                event_ids = %notice.event_ids.join(","),
                "held notice delivered on its retry; its messages are acked when they come back"
            );
            self.metrics
                .notice_sent(notice.summary, notice.customer_count);
            self.remember_resent(&notice.event_ids);
        }
        *self.held_events.lock().expect("not poisoned") = None;
        self.fault_from_send.store(false, Ordering::SeqCst);
        self.budget.release();
        Ok(())
    }

    /// The held notice as it would be sent now: its events older than
    /// `NOTIFIER_MAX_AGE` left out (they are dead-lettered `expired` when they
    /// come back from the queue, like any event that waited too long), `None`
    /// when nothing is left. A notice that claimed events in the grant
    /// ledger goes with exactly the claimed ids: its rows are marked with
    /// its notice id, and a notice sent again for them must carry the same
    /// ids (section 8.8); the max age does not apply to held events (8.5).
    fn held_notice_now(&self) -> Option<(Notice, Option<held::HeldClaim>)> {
        let mut held = self.held_events.lock().expect("not poisoned");
        let h = held.as_mut()?;
        let claimed = h.ledger.as_ref().is_some_and(|c| c.claimed.is_some());
        let events = &mut h.events;
        let now = chrono::Utc::now();
        let before = events.len();
        if !claimed {
            events.retain(|e| !is_expired(e.occurred_at, now, self.settings.max_age));
        }
        if events.len() < before {
            info!(
                expired = before - events.len(),
                "held events passed NOTIFIER_MAX_AGE: not re-sent, dead-lettered when they come back"
            );
        }
        if events.is_empty() {
            *held = None;
            return None;
        }
        let refs: Vec<&AssignmentEvent> = events.iter().collect();
        Some((Notice::from_events(&refs), h.ledger.clone()))
    }

    /// Remembers an accepted re-send's events for `NOTIFIER_MAX_AGE` (older
    /// events are dead-lettered anyway); ids whose time is up go.
    fn remember_resent(&self, ids: &[String]) {
        let now = Instant::now();
        let until = now + self.settings.max_age;
        let mut resent = self.resent.lock().expect("not poisoned");
        resent.retain(|_, t| *t > now);
        resent.extend(ids.iter().map(|id| (id.clone(), until)));
    }

    /// The token for one call outside a notice's loop (the start-up probe,
    /// the held notice's re-send) after its rate slot, which may have waited
    /// out a pause: as `WeChat::token_after_wait`, else the fetch is waited
    /// for (one call, so no burst behind it).
    async fn token_after_wait(&self, taken: &Secret) -> Result<Secret, CallResult> {
        match self.wechat.token_after_wait(taken) {
            Some(token) => Ok(token),
            None => self.wechat.token().await,
        }
    }

    /// A quota answer outside a notice's loop (the start-up probe, the held
    /// notice's re-send) pauses every call as it would there.
    fn pause_on_quota(&self, outcome: Outcome) {
        match outcome {
            Outcome::MinuteQuota => self.budget.pause(
                policy::until_next_minute(SystemTime::now()),
                QuotaKind::Minute,
            ),
            Outcome::DailyQuota => self.pause_daily(Duration::ZERO),
            _ => {}
        }
    }

    /// Pauses every call for a daily quota (45009): at least `at_least`, and
    /// growing along the retry ladder with the replica's run of 45009s, not
    /// only with one notice's rounds (fresh notices meeting the quota one
    /// after another must not keep it at the ladder's first step).
    fn pause_daily(&self, at_least: Duration) {
        let run = self.budget.daily_quota_run();
        let d = at_least.max(self.settle.rules().rung(i64::from(run) - 1));
        self.budget.pause(d, QuotaKind::Daily);
    }

    /// Sends the held notice again (its rate slot taken): WeChat's answer.
    async fn resend(&self, notice: &Notice, token: &Secret) -> CallResult {
        match self.wechat.prepare(notice) {
            Ok(prepared) => self.wechat.call(&prepared, token).await,
            // Cannot happen for a notice that reached WeChat; keeps holding.
            Err(local) => local,
        }
    }

    /// Forgets the held notice (not the fault): its events are not this
    /// replica's to send any more.
    fn forget_held_notice(&self, why: &str) {
        if let Some(held) = self.held_events.lock().expect("not poisoned").take() {
            info!(
                events = held.events.len(),
                why, "not re-sending the held notice"
            );
        }
    }

    /// Another replica consumes the queue now (the broker gave it the queue
    /// when this replica's session ended): it has the held notice's events
    /// and sends them itself, and it finds the fault itself if the fault is
    /// still there. This replica forgets the notice and the fault, so its
    /// `/readyz` and fault gauge do not report a fault of a queue it does not
    /// serve; it makes no call until it becomes the active consumer.
    pub fn not_the_active_one(&self) {
        self.forget_held_notice(
            "another replica consumes the queue: it has the held notice's events",
        );
        if self.fault_from_send.swap(false, Ordering::SeqCst) {
            info!("another replica consumes the queue: this one no longer reports the fault found on its send");
        }
        self.budget.release();
    }

    /// Whether a notice held for a fault found on its send waits to be sent
    /// again (the session then marks the queue as taken while it does).
    pub fn holds_notice(&self) -> bool {
        self.held_events.lock().expect("not poisoned").is_some()
    }

    /// Whether a configuration fault is held (the session does not consume
    /// while the check before consuming fails with one held).
    pub fn fault_held(&self) -> bool {
        self.budget.is_held()
    }

    /// Whether `event_id` was delivered by a re-sent held notice (its
    /// delivery is acked without another notice). Every delivery of it
    /// answers so, not only the first: the CRM may have published it twice.
    pub fn already_delivered(&self, event_id: &str) -> bool {
        let resent = self.resent.lock().expect("not poisoned");
        !resent.is_empty()
            && resent
                .get(event_id)
                .is_some_and(|until| *until > Instant::now())
    }

    /// This replica became the active consumer (its first delivery of a
    /// session): its rate bucket starts empty, so a takeover adds no burst.
    pub fn now_active(&self) {
        self.budget.empty();
        if let Some(l) = &self.ledger {
            l.session_started();
        }
    }

    /// Takes this window's place in its assignee's lane. Called in arrival
    /// order, synchronously, so an assignee's notices go out one at a time and
    /// in order, while different assignees' run concurrently.
    pub fn ticket(&self, closed: &Closed<Pending>) -> Ticket {
        let key = closed
            .events
            .first()
            .map_or("", |e| e.assignee.user_id.as_str());
        self.lanes.ticket(key)
    }

    /// A place in `user`'s lane (a subscription event goes one at a time
    /// with the user's notices).
    pub fn lane(&self, user: &str) -> Ticket {
        self.lanes.ticket(user)
    }

    /// Sends one closed window (after its assignee's previous one) and settles
    /// every delivery it holds.
    pub async fn deliver(&self, mut closed: Closed<Pending>, ticket: Ticket) {
        let _turn = ticket.wait().await;
        let notice = closed.notice();
        let span = tracing::info_span!(
            "notice",
            notice_id = %notice.notice_id,
            assignee = %notice.assignee.user_id,
            events = notice.customer_count,
        );
        // With export on, the notice's OpenTelemetry span (src/trace.rs),
        // linked to each event's receive span and current while it is sent.
        let otel = if crate::trace::enabled() {
            let events: Vec<crate::trace::Ctx> = closed
                .deliveries
                .iter()
                .filter_map(|(_, p)| p.trace.as_deref().copied())
                .collect();
            crate::trace::open_notice(
                if closed.held > 0 {
                    "notice release"
                } else {
                    "notice"
                },
                &events,
                vec![
                    KeyValue::new("notifier.notice_id", notice.notice_id.clone()),
                    KeyValue::new("notifier.assignee_id", notice.assignee.user_id.clone()),
                    KeyValue::new("notifier.event_count", notice.customer_count as i64),
                    KeyValue::new("notifier.summary", notice.summary),
                    KeyValue::new("notifier.held_events", closed.held as i64),
                ],
            )
        } else {
            None
        };
        let sent = async {
            match self.ledger.clone() {
                Some(ledger) => {
                    let user = notice.assignee.user_id.clone();
                    self.deliver_ledgered(&ledger, &user, closed).await
                }
                None => self.send(&mut closed, notice, None).await,
            }
        }
        .instrument(span);
        let ended = crate::trace::within(otel.as_ref(), sent).await;
        self.end_span(otel, &ended);
    }

    /// The spans of a release by an accept: the `tracing` span of its log
    /// lines and, with export on, its OpenTelemetry span: a child of the
    /// accept's receive span, linked to the open window's events here and to
    /// the held events once they are claimed.
    pub(crate) fn release_span(
        &self,
        user: &str,
        window: &Closed<Pending>,
        accept: Option<crate::trace::Ctx>,
    ) -> (tracing::Span, Option<opentelemetry::Context>) {
        let span = tracing::info_span!("notice", assignee = %user);
        if !crate::trace::enabled() {
            return (span, None);
        }
        let mut events: Vec<crate::trace::Ctx> = accept.into_iter().collect();
        events.extend(
            window
                .deliveries
                .iter()
                .filter_map(|(_, p)| p.trace.as_deref().copied()),
        );
        let otel = crate::trace::open_notice(
            "notice release",
            &events,
            vec![
                KeyValue::new("notifier.assignee_id", user.to_string()),
                KeyValue::new("notifier.event_count", window.events.len() as i64),
            ],
        );
        (span, otel)
    }

    /// Sets the outcome on a notice's span and ends it (export on).
    pub(crate) fn end_span(&self, otel: Option<opentelemetry::Context>, ended: &Ended) {
        if otel.is_none() {
            return;
        }
        let (outcome, errcode) = match ended {
            Ended::Accepted => ("accepted", None),
            Ended::Held => ("held", None),
            Ended::Parked | Ended::ParkedForLedger => ("parked", None),
            Ended::DeadLettered(reason, result) => (reason.as_str(), result.errcode),
            Ended::Gone => ("expired", None),
        };
        let mut attrs = vec![KeyValue::new("notifier.outcome", outcome)];
        if let Some(code) = errcode {
            attrs.push(KeyValue::new("wechat.errcode", code));
        }
        crate::trace::close_notice(otel, attrs);
    }

    /// Dead-letters an event that breaks the schema.
    pub async fn dead_letter_invalid(&self, pending: Pending, detail: String) {
        self.settle.dead_letter_invalid(pending, detail).await;
    }

    /// Closes the publishing connection (at the end of the service).
    pub async fn close(&self) {
        self.settle.close().await;
    }

    async fn send(
        &self,
        closed: &mut Closed<Pending>,
        notice: Notice,
        ledger: Option<&mut LedgerCtx>,
    ) -> Ended {
        // Held while this notice is the one retried during a configuration fault.
        let mut probe: Option<ProbeTurn> = None;
        let ended = self
            .send_until_settled(closed, notice, &mut probe, ledger)
            .await;
        // The retried notice left the fault another way (expired, parked,
        // dead-lettered): a later session must not send it again.
        if probe.is_some() {
            *self.held_events.lock().expect("not poisoned") = None;
        }
        ended
    }

    async fn send_until_settled(
        &self,
        closed: &mut Closed<Pending>,
        mut notice: Notice,
        probe: &mut Option<ProbeTurn>,
        mut ledger: Option<&mut LedgerCtx>,
    ) -> Ended {
        let mut tries = Tries::default();
        // Calls judged in this round (span events), after the rounds before.
        let mut judged: i64 = 0;
        loop {
            let (result, answered) = match self
                .attempt(closed, &mut notice, probe.as_ref(), ledger.as_deref_mut())
                .await
            {
                Attempt::Local(r) => (r, false),
                Attempt::Answered(r) => (r, true),
                Attempt::Probe(turn) => {
                    *probe = Some(turn);
                    continue;
                }
                Attempt::Again => continue,
                Attempt::Done => return Ended::Gone,
                Attempt::ParkedForLedger => return Ended::ParkedForLedger,
            };
            judged += 1;
            crate::trace::event("attempt", {
                let round = closed
                    .deliveries
                    .iter()
                    .map(|(_, p)| p.attempts)
                    .max()
                    .unwrap_or(0);
                let mut a = vec![
                    opentelemetry::KeyValue::new("notifier.attempt", judged),
                    opentelemetry::KeyValue::new("notifier.round", round.saturating_add(1)),
                    opentelemetry::KeyValue::new("notifier.outcome", result.outcome.as_str()),
                ];
                if let Some(code) = result.errcode {
                    a.push(opentelemetry::KeyValue::new("wechat.errcode", code));
                }
                a
            });
            debug!(
                outcome = result.outcome.as_str(),
                errcode = result.errcode.unwrap_or_default(),
                answered,
                "attempt judged"
            );
            let prior = closed
                .deliveries
                .iter()
                .map(|(_, p)| p.attempts)
                .max()
                .unwrap_or(0);
            let step =
                self.settle
                    .rules()
                    .decide(result.outcome, prior, &mut tries, SystemTime::now());
            // Only WeChat's answer that proves the settings work ends a held fault.
            if probe.is_some() && answered && result.outcome.proves_settings() {
                self.fault_from_send.store(false, Ordering::SeqCst);
                self.budget.release();
                *self.held_events.lock().expect("not poisoned") = None;
                *probe = None;
            }
            // With the grant ledger, a `43101` (or no openid in the direct
            // mode) holds the notice until the user's next accept. Judged
            // after the fault check above: a 43101 proves the settings.
            if let Some(ctx) = ledger.as_deref_mut() {
                match self.hold_on(ctx, closed, &notice, &result).await {
                    OnHold::NotAHold => {}
                    OnHold::Held => return Ended::Held,
                    OnHold::SendAgain => continue,
                    OnHold::Parked => return Ended::ParkedForLedger,
                }
            }
            match step {
                Step::Ack => {
                    self.budget.quota_streak_ends();
                    self.settle.ack_all(closed, &notice).await;
                    return Ended::Accepted;
                }
                Step::RetryAfter(d) if d.is_zero() => {}
                Step::RetryAfter(d) => tokio::time::sleep(jitter(d)).await,
                Step::PauseAll(d) => self.budget.pause(d, QuotaKind::Minute),
                Step::Park { exhausted, pause } => {
                    if let Some(d) = pause {
                        self.pause_daily(d);
                    }
                    self.settle
                        .park_all(closed, &notice, &result, exhausted)
                        .await;
                    return Ended::Parked;
                }
                Step::DeadLetter(reason) => {
                    self.settle
                        .dead_letter_all(closed, &notice, reason, &result)
                        .await;
                    return Ended::DeadLettered(reason, result);
                }
                Step::Hold => {
                    let turn = self.budget.hold(&result.detail);
                    self.fault_from_send.store(true, Ordering::SeqCst);
                    *self.held_events.lock().expect("not poisoned") = Some(HeldNotice {
                        events: closed.events.clone(),
                        ledger: ledger.as_deref().and_then(LedgerCtx::held_claim),
                    });
                    // Without the turn, another notice is the one retried: the
                    // next `take` waits for it (or takes over if it leaves).
                    if probe.is_none() {
                        *probe = turn;
                    }
                }
            }
        }
    }

    /// One pass: the local verdict, the token, the rate slot (or the probe's
    /// turn), expiry, then the call. The token comes before the slot, so no
    /// slot is held while a token is fetched (the budget would otherwise let
    /// every call that took a slot meanwhile go at once when the fetch ends).
    async fn attempt(
        &self,
        closed: &mut Closed<Pending>,
        notice: &mut Notice,
        probe: Option<&ProbeTurn>,
        ledger: Option<&mut LedgerCtx>,
    ) -> Attempt {
        if let Err(local) = self.wechat.prepare(notice) {
            return Attempt::Local(local);
        }
        if probe.is_some() {
            tokio::time::sleep(self.settings.config_retry).await;
        }
        // A place among the calls in flight, before the token and the slot
        // (so the call still goes out right after its slot). The probe of a
        // held fault takes none: the calls holding places wait for its answer.
        let place = match probe {
            Some(_) => None,
            None => Some(
                self.in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("never closed"),
            ),
        };
        // While a fault is held only the retried notice fetches a token (a
        // fetch that found the fault, 40125 after a secret rotation, would
        // otherwise be asked again at once by every window).
        if probe.is_none() {
            if let Some(turn) = self.budget.wait_while_held().await {
                return Attempt::Probe(turn);
            }
        }
        // A token before the slot (no slot held during a fetch); the call
        // takes the freshest one after the slot.
        let token = match self.wechat.token().await {
            Ok(t) => t,
            Err(e) => return Attempt::Answered(e),
        };
        // The rate-limit wait, as an event on the notice's span.
        let waiting = crate::trace::enabled().then(std::time::Instant::now);
        let paused = match probe {
            Some(turn) => self.budget.take_as_probe(turn).await.err(),
            None => match self.budget.take().await {
                Turn::Go => None,
                Turn::Probe(turn) => return Attempt::Probe(turn),
                Turn::Paused { left, errcode } => Some((left, errcode)),
            },
        };
        if let Some(since) = waiting {
            crate::trace::event(
                "rate slot",
                vec![KeyValue::new(
                    "notifier.waited_ms",
                    since.elapsed().as_secs_f64() * 1000.0,
                )],
            );
        }
        if let Some((left, errcode)) = paused {
            drop(place); // parking makes no call
            self.settle
                .park_for_pause(closed, notice, left, errcode)
                .await;
            return Attempt::Done;
        }
        // Expiry is judged when the notice would be sent, not when it closed:
        // it may have waited behind a pause or a held fault.
        match self.settle.drop_expired(closed).await {
            Expiry::Nothing => {}
            // The dead letters' confirms took time: this slot is spent
            // unused, and the rest of the notice takes a new one (a call goes
            // out right after its slot, never bunched behind a late one).
            Expiry::Some => {
                let before = std::mem::replace(notice, closed.notice());
                let mut claim = None;
                if let Some(ctx) = ledger {
                    if !self.follow_claim(ctx, &before, notice).await {
                        self.settle
                            .park_for_ledger(
                                closed,
                                notice,
                                "the grant ledger is unavailable and the notice's claim could not follow its events' expiry; the notice waits in a retry queue (not a failed attempt)",
                                None,
                            )
                            .await;
                        return Attempt::ParkedForLedger;
                    }
                    claim = ctx.held_claim();
                }
                if probe.is_some() {
                    // A later session re-sends only what is still held.
                    if let Some(h) = self.held_events.lock().expect("not poisoned").as_mut() {
                        h.events = closed.events.clone();
                        if claim.is_some() {
                            h.ledger = claim;
                        }
                    }
                }
                return Attempt::Again;
            }
            Expiry::All => return Attempt::Done,
        }
        // No usable token after the slot (ours rejected meanwhile, none
        // fetched yet): the slot goes unused, the notice takes a token again.
        let Some(token) = self.wechat.token_after_wait(&token) else {
            return Attempt::Again;
        };
        match self.wechat.prepare(notice) {
            Ok(prepared) => Attempt::Answered(self.wechat.call(&prepared, &token).await),
            Err(local) => Attempt::Local(local),
        }
    }
}

/// ±25% jitter so replicas that failed together do not retry together.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::publish::{sample_events, Bulk};

    fn dispatcher() -> Arc<Dispatcher> {
        let settings = Settings::from_pairs([
            ("WECHAT_APPID", "wx0000000000000000"),
            ("WECHAT_APPSECRET", "not-a-secret"),
            ("WECHAT_CLOUD_ENV", "env-1"),
            ("NOTIFIER_MAX_AGE", "1h"),
        ])
        .expect("valid settings");
        Dispatcher::new(
            Arc::new(settings),
            Arc::new(Metrics::new()),
            Arc::new(Health::default()),
            None,
            "unit",
        )
    }

    /// Events for one assignee, the first `old` of them two hours old.
    fn events(n: usize, old: usize) -> Vec<AssignmentEvent> {
        let mut bodies = sample_events(&Bulk::new(n, 1));
        let two_hours_ago = chrono::Local::now().fixed_offset() - chrono::Duration::hours(2);
        for b in bodies.iter_mut().take(old) {
            b["occurred_at"] = serde_json::json!(two_hours_ago.to_rfc3339());
        }
        bodies
            .iter()
            .map(|b| crate::event::parse(b.to_string().as_bytes()).expect("a valid event"))
            .collect()
    }

    #[tokio::test]
    async fn the_re_sent_notice_leaves_out_events_past_the_max_age() {
        let d = dispatcher();
        let held = events(3, 1);
        *d.held_events.lock().unwrap() = Some(HeldNotice {
            events: held.clone(),
            ledger: None,
        });
        let (notice, _) = d.held_notice_now().expect("two events are fresh");
        assert_eq!(
            notice.event_ids,
            [held[1].event_id.clone(), held[2].event_id.clone()]
        );
        assert_eq!(notice.customer_count, 2);
        assert_eq!(
            notice.notice_id,
            crate::notice::notice_id(&notice.event_ids)
        );

        *d.held_events.lock().unwrap() = Some(HeldNotice {
            events: events(2, 2),
            ledger: None,
        });
        assert!(d.held_notice_now().is_none(), "nothing fresh to re-send");
        assert!(!d.holds_notice(), "an all-expired notice is no longer held");
    }

    #[tokio::test]
    async fn every_delivery_of_a_re_sent_event_is_acked_not_only_the_first() {
        let d = dispatcher();
        d.remember_resent(&["e1".to_string(), "e2".to_string()]);
        assert!(d.already_delivered("e1"));
        assert!(
            d.already_delivered("e1"),
            "a second delivery (a re-publish) too"
        );
        assert!(d.already_delivered("e2"));
        assert!(!d.already_delivered("e3"));
    }
}
