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
pub mod lanes;
pub mod policy;
pub mod settle;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{debug, Instrument};

use crate::broker::{Pending, Publisher};
use crate::coalescer::Closed;
use crate::http::Health;
use crate::metrics::Metrics;
use crate::notice::Notice;
pub use crate::reason::Reason;
use crate::settings::Settings;
use crate::wechat::{CallResult, Outcome, WeChat};
pub use budget::quota;
use budget::{Budget, ProbeTurn, QuotaKind, Turn};
use lanes::{Lanes, Ticket};
use policy::{Step, Tries};
use settle::{Expiry, Settler};

/// Shared by every window this replica sends; outlives broker sessions so the
/// token cache, the rate budget and a held fault survive a reconnect.
pub struct Dispatcher {
    settings: Arc<Settings>,
    wechat: WeChat,
    budget: Budget,
    lanes: Lanes,
    settle: Settler,
    /// The held configuration fault was found on a real send. The start-up
    /// probe cannot see such a fault, so its passing does not end it: a new
    /// session consumes with the fault still held, and one of its windows
    /// becomes the notice retried (an accepted retry settles exactly the
    /// events it carried).
    fault_found_on_send: AtomicBool,
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
    /// Nothing left to send (expired, or parked during a quota pause).
    Done,
}

impl Dispatcher {
    /// `name` names the publishing connection (copies to retry and dead-letter queues).
    pub fn new(
        settings: Arc<Settings>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        name: &str,
    ) -> Self {
        let publisher = Publisher::new(settings.amqp_urls.clone(), format!("{name}-publish"));
        Dispatcher {
            wechat: WeChat::new(&settings, metrics.clone()),
            budget: Budget::new(
                settings.rate_per_sec,
                settings.rate_burst,
                health,
                metrics.clone(),
            ),
            lanes: Lanes::default(),
            settle: Settler::new(publisher, settings.clone(), metrics),
            fault_found_on_send: AtomicBool::new(false),
            settings,
        }
    }

    /// Before consuming: reaches WeChat without a notice (within the rate
    /// budget) to find configuration faults. A fault it finds is held (not
    /// ready, with the reason); its passing releases a fault it found, but not
    /// one found on a real send, which only a real send can prove gone.
    ///
    /// # Errors
    /// The classified failure; the caller decides which outcomes matter.
    pub async fn check_before_consuming(&self) -> Result<(), CallResult> {
        // The token before the rate slot (no slot held during a fetch).
        let result = match self.wechat.token().await {
            Ok(token) => {
                self.budget.take_unheld().await;
                self.wechat.probe_with(&token).await
            }
            Err(e) => Err(e),
        };
        match &result {
            Ok(()) if !self.fault_found_on_send.load(Ordering::SeqCst) => self.budget.release(),
            Ok(()) => {}
            Err(e) if e.outcome == Outcome::ConfigFault => drop(self.budget.hold(&e.detail)),
            Err(_) => {}
        }
        result
    }

    /// This replica became the active consumer (its first delivery of a
    /// session): its rate bucket starts empty, so a takeover adds no burst.
    pub fn now_active(&self) {
        self.budget.empty();
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

    /// Sends one closed window (after its assignee's previous one) and settles
    /// every delivery it holds.
    pub async fn deliver(&self, mut closed: Closed<Pending>, ticket: Ticket) {
        let _turn = ticket.wait().await;
        let notice = closed.notice();
        let span = tracing::info_span!(
            "notice",
            notice_id = %notice.notice_id,
            assignee = %notice.assignee.user_id,
            events = notice.customer_count
        );
        self.send(&mut closed, notice).instrument(span).await;
    }

    /// Dead-letters an event that breaks the schema.
    pub async fn dead_letter_invalid(&self, pending: Pending, detail: String) {
        self.settle.dead_letter_invalid(pending, detail).await;
    }

    /// Closes the publishing connection (at the end of the service).
    pub async fn close(&self) {
        self.settle.close().await;
    }

    async fn send(&self, closed: &mut Closed<Pending>, mut notice: Notice) {
        let mut tries = Tries::default();
        // Held while this notice is the one retried during a configuration fault.
        let mut probe: Option<ProbeTurn> = None;
        loop {
            let (result, answered) = match self.attempt(closed, &mut notice, probe.as_ref()).await {
                Attempt::Local(r) => (r, false),
                Attempt::Answered(r) => (r, true),
                Attempt::Probe(turn) => {
                    probe = Some(turn);
                    continue;
                }
                Attempt::Done => return,
            };
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
                self.fault_found_on_send.store(false, Ordering::SeqCst);
                self.budget.release();
                probe = None;
            }
            match step {
                Step::Ack => return self.settle.ack_all(closed, &notice).await,
                Step::RetryAfter(d) if d.is_zero() => {}
                Step::RetryAfter(d) => tokio::time::sleep(jitter(d)).await,
                Step::PauseAll(d) => self.budget.pause(d, QuotaKind::Minute),
                Step::Park { exhausted, pause } => {
                    if let Some(d) = pause {
                        self.budget.pause(d, QuotaKind::Daily);
                    }
                    return self
                        .settle
                        .park_all(closed, &notice, &result, exhausted)
                        .await;
                }
                Step::DeadLetter(reason) => {
                    return self
                        .settle
                        .dead_letter_all(closed, &notice, reason, &result)
                        .await;
                }
                Step::Hold => {
                    self.fault_found_on_send.store(true, Ordering::SeqCst);
                    let turn = self.budget.hold(&result.detail);
                    // Without the turn, another notice is the one retried: the
                    // next `take` waits for it (or takes over if it leaves).
                    if probe.is_none() {
                        probe = turn;
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
    ) -> Attempt {
        if let Err(local) = self.wechat.prepare(notice) {
            return Attempt::Local(local);
        }
        if probe.is_some() {
            tokio::time::sleep(self.settings.config_retry).await;
        }
        let token = match self.wechat.token().await {
            Ok(t) => t,
            Err(e) => return Attempt::Answered(e),
        };
        let paused = match probe {
            Some(turn) => self.budget.take_as_probe(turn).await.err(),
            None => match self.budget.take().await {
                Turn::Go => None,
                Turn::Probe(turn) => return Attempt::Probe(turn),
                Turn::Paused { left, errcode } => Some((left, errcode)),
            },
        };
        if let Some((left, errcode)) = paused {
            self.settle
                .park_for_pause(closed, notice, left, errcode)
                .await;
            return Attempt::Done;
        }
        // Expiry is judged when the notice would be sent, not when it closed:
        // it may have waited behind a pause or a held fault.
        match self.settle.drop_expired(closed).await {
            Expiry::Nothing => {}
            Expiry::Some => *notice = closed.notice(),
            Expiry::All => return Attempt::Done,
        }
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
