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

use std::sync::{Arc, Mutex};
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
use budget::{Budget, ProbeTurn, QuotaKind};
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
    /// The notice whose real send found the configuration fault being held:
    /// a new session sends it again before consuming (the start-up probe
    /// cannot see such a fault). Its `notice_id` lets WeChat's side drop a
    /// duplicate.
    held_notice: Mutex<Option<Notice>>,
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
            held_notice: Mutex::new(None),
            settings,
        }
    }

    /// Before consuming: reaches WeChat without a notice (within the rate
    /// budget) to find configuration faults; and if a fault found on a real
    /// send is held, sends that notice again, since only a real send shows
    /// such a fault. A configuration fault is held (not ready, with the
    /// reason); passing releases it.
    ///
    /// # Errors
    /// The classified failure; the caller decides which outcomes matter.
    pub async fn check_before_consuming(&self) -> Result<(), CallResult> {
        self.budget.take_unheld().await;
        let mut result = self.wechat.probe().await;
        let held = self.held_notice.lock().expect("not poisoned").clone();
        if let (Ok(()), Some(notice)) = (&result, held) {
            if self.budget.is_held() {
                self.budget.take_unheld().await;
                let sent = self.wechat.send(&notice).await;
                result = match sent.outcome {
                    Outcome::ConfigFault => Err(sent),
                    _ => Ok(()),
                };
            }
        }
        match &result {
            Ok(()) => {
                *self.held_notice.lock().expect("not poisoned") = None;
                self.budget.release();
            }
            Err(e) if e.outcome == Outcome::ConfigFault => drop(self.budget.hold(&e.detail)),
            Err(_) => {}
        }
        result
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
            match &probe {
                Some(turn) => {
                    tokio::time::sleep(self.settings.config_retry).await;
                    self.budget.take_as_probe(turn).await;
                }
                None => {
                    if let Some(turn) = self.budget.take().await {
                        probe = Some(turn);
                        continue;
                    }
                }
            }
            // Expiry is judged when the notice would be sent, not when it closed:
            // it may have waited behind a pause or a held fault.
            match self.settle.drop_expired(closed).await {
                Expiry::Nothing => {}
                Expiry::Some => notice = closed.notice(),
                Expiry::All => return,
            }
            let prior = closed
                .deliveries
                .iter()
                .map(|(_, p)| p.attempts)
                .max()
                .unwrap_or(0);
            let result = self.wechat.send(&notice).await;
            debug!(
                outcome = result.outcome.as_str(),
                errcode = result.errcode.unwrap_or_default(),
                "WeChat answered"
            );
            let step =
                self.settle
                    .rules()
                    .decide(result.outcome, prior, &mut tries, SystemTime::now());
            // Only an answer that proves the settings work ends a held fault.
            if probe.is_some() && result.outcome.proves_settings() {
                self.budget.release();
                *self.held_notice.lock().expect("not poisoned") = None;
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
                    let turn = self.budget.hold(&result.detail);
                    *self.held_notice.lock().expect("not poisoned") = Some(notice.clone());
                    // Without the turn, another notice is the one retried: the
                    // next `take` waits for it (or takes over if it leaves).
                    if probe.is_none() {
                        probe = turn;
                    }
                }
            }
        }
    }
}

/// ±25% jitter so replicas that failed together do not retry together.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() * 0.5)
}
