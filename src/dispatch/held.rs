//! Notices with the grant ledger (contract section 8): what a notice covers
//! (its window plus the user's held events, each once), when it is held
//! instead of sent (an exact 0, a `43101`, no openid in the direct mode), what
//! an accept releases, and what the ledger learns from each outcome. The
//! credit rules themselves are `ledger::rules`; the SQL is `ledger::store`.
//! The ledger never holds up a delivery it cannot reach: notices go on
//! without their held events, and what needs it waits in the retry queues.

use std::sync::Arc;

use chrono::SecondsFormat;
use serde_json::json;
use tracing::Instrument as _;
use tracing::{info, warn};

use super::{Dispatcher, Ended};
use crate::broker::Pending;
use crate::coalescer::{CloseReason, Closed};
use crate::event::{self, AssignmentEvent};
use crate::event::{SubscriptionEvent, SubscriptionStatus};
use crate::ledger::rules::{self, Plan, Status};
use crate::ledger::store::{HeldRow, HoldArgs, HoldDone, Spent, ToHold};
use crate::ledger::Ledger;
use crate::notice::{notice_id, Notice};
use crate::reason::Reason;
use crate::wechat::{CallResult, Outcome};

/// The errcode WeChat answers when the user has no credit left.
pub const NO_CREDIT: i64 = 43101;

/// What a notice's loop knows of the ledger.
pub(crate) struct LedgerCtx {
    ledger: Arc<Ledger>,
    user: String,
    /// The count's version when the notice read the ledger (a hold sets an
    /// exact 0 only if it is unchanged).
    version: i64,
    /// The notice id its held events were claimed under.
    claimed: Option<String>,
    /// The ledger did not answer: a `43101` parks the notice (not an attempt).
    down: bool,
    /// A notice a crash left with an unknown outcome, sent again: its
    /// window's deliveries may be acked already, so its rows are the only
    /// copy and an unclaim keeps them held.
    stale: bool,
}

/// What a notice held for a configuration fault leaves for its re-send by a
/// later session (see `Dispatcher::retry_held`): the user, and the notice id
/// its held events were claimed under (none: nothing claimed).
#[derive(Debug, Clone)]
pub(crate) struct HeldClaim {
    pub user: String,
    pub claimed: Option<String>,
}

/// What a `43101` (or a missing openid) did.
pub(crate) enum OnHold {
    /// Not a hold: the policy decides.
    NotAHold,
    Held,
    SendAgain,
    Parked,
}

/// Why a notice is held.
#[derive(Debug, Clone, Copy)]
enum HoldReason {
    NoCredit,
    NoOpenid,
}

impl HoldReason {
    fn as_str(self) -> &'static str {
        match self {
            HoldReason::NoCredit => "no_credit",
            HoldReason::NoOpenid => "no_openid",
        }
    }
}

/// The window's events as rows to hold (original body, trace context, attempts).
fn to_hold(closed: &Closed<Pending>) -> Vec<ToHold> {
    let mut out: Vec<ToHold> = Vec::new();
    for (i, p) in &closed.deliveries {
        let Some(e) = closed.events.get(*i) else {
            continue;
        };
        if *i < closed.held || out.iter().any(|h| h.event_id == e.event_id) {
            continue;
        }
        out.push(ToHold {
            event_id: e.event_id.clone(),
            body: p.body.to_vec(),
            traceparent: p.trace.as_ref().map(|c| c.header()),
            attempts: i32::try_from(p.attempts).unwrap_or(i32::MAX),
        });
    }
    out
}

/// Puts the held events (oldest first) in front of the window's, each event
/// id once: a window event the ledger already holds keeps its deliveries,
/// which are acked with the notice.
fn prepend_held(closed: &mut Closed<Pending>, held: Vec<AssignmentEvent>) {
    if held.is_empty() {
        return;
    }
    let k = held.len();
    let mut events = held;
    let mut index = Vec::with_capacity(closed.events.len());
    for e in std::mem::take(&mut closed.events) {
        match events[..k].iter().position(|h| h.event_id == e.event_id) {
            Some(at) => index.push(at),
            None => {
                index.push(events.len());
                events.push(e);
            }
        }
    }
    for (i, _) in &mut closed.deliveries {
        *i = index[*i];
    }
    closed.events = events;
    closed.held = k;
}

/// Whether a delivery came back after this service had it: redelivered (a
/// crash, a lost ack) or a copy from a retry queue. The grant ledger may
/// hold or have settled its event.
fn a_copy(p: &Pending) -> bool {
    p.redelivered || p.first_failed_at.is_some()
}

/// A held row's event (its body was valid when it was held).
fn parse_rows(rows: &[HeldRow]) -> Vec<AssignmentEvent> {
    rows.iter()
        .filter_map(|r| match event::parse(&r.body) {
            Ok(e) => Some(e),
            Err(e) => {
                warn!(event_id = %r.event_id, detail = %e.detail, "a held event no longer parses; left in the ledger");
                None
            }
        })
        .collect()
}

fn empty_window() -> Closed<Pending> {
    Closed {
        events: Vec::new(),
        deliveries: Vec::new(),
        reason: CloseReason::Release,
        held: 0,
    }
}

impl Dispatcher {
    /// Sends one closed window of `user` (possibly empty: a release) with
    /// the user's held events, or holds it; settles every delivery and tells
    /// the ledger the outcome.
    pub(crate) async fn deliver_ledgered(
        &self,
        ledger: &Arc<Ledger>,
        user: &str,
        closed: Closed<Pending>,
    ) -> Ended {
        self.deliver_with_held(ledger, user, closed).await.0
    }

    /// [`Dispatcher::deliver_ledgered`], and whether the user's held events
    /// were left out because the ledger did not answer (a release not done).
    async fn deliver_with_held(
        &self,
        ledger: &Arc<Ledger>,
        user: &str,
        mut closed: Closed<Pending>,
    ) -> (Ended, bool) {
        let state = match ledger.user(user).await {
            Ok(s) => s,
            Err(_) => {
                // Section 8.8: the notice goes without its held events; a
                // copy of an event the ledger may hold waits instead.
                self.park_copies(&mut closed).await;
                if closed.events.is_empty() {
                    return (Ended::ParkedForLedger, true);
                }
                let mut ctx = LedgerCtx {
                    ledger: ledger.clone(),
                    user: user.to_string(),
                    version: 0,
                    claimed: None,
                    down: true,
                    stale: false,
                };
                let notice = closed.notice();
                return (self.send(&mut closed, notice, Some(&mut ctx)).await, true);
            }
        };
        if closed.deliveries.iter().any(|(_, p)| a_copy(p)) {
            self.ack_known(ledger, &mut closed).await;
        }
        let mut ctx = LedgerCtx {
            ledger: ledger.clone(),
            user: user.to_string(),
            version: state.credit.version,
            claimed: None,
            down: false,
            stale: false,
        };
        // Known to be at an exact 0 (and no probe due): the notice is held
        // without a call, so its user's held events need no claim.
        let plan = rules::plan(
            state.credit,
            Ledger::since_probe(&state),
            ledger.settings().credit_probe,
        );
        let no_call = matches!(plan, Plan::HoldWithoutCall);
        if state.held > 0 && !no_call {
            let window = to_hold(&closed);
            let window_ids: Vec<String> =
                closed.events.iter().map(|e| e.event_id.clone()).collect();
            let claim = ledger
                .store()
                .claim(user, ledger.template_id(), &window, |free| {
                    let mut ids: Vec<&str> = free.iter().map(|r| r.event_id.as_str()).collect();
                    for id in &window_ids {
                        if !ids.contains(&id.as_str()) {
                            ids.push(id);
                        }
                    }
                    notice_id(&ids)
                })
                .await;
            ledger.record(&claim.as_ref().map(|_| ()).map_err(|f| f.error.clone()));
            match claim {
                Ok(claim) => {
                    // Notices whose outcome a crash left unknown go again
                    // first, with exactly their ids.
                    for (stale_id, rows) in claim.stale {
                        let mut again = empty_window();
                        prepend_held(&mut again, parse_rows(&rows));
                        let mut stale_ctx = LedgerCtx {
                            claimed: Some(stale_id),
                            stale: true,
                            ..ctx.clone_for_release()
                        };
                        let notice = again.notice();
                        info!(notice_id = %notice.notice_id, events = rows.len(), "a notice whose outcome is unknown is sent again with the same events");
                        let ended = self.send(&mut again, notice, Some(&mut stale_ctx)).await;
                        self.after(&mut stale_ctx, &again, ended).await;
                    }
                    prepend_held(&mut closed, parse_rows(&claim.rows));
                    crate::trace::released(claim.rows.iter().map(|r| r.traceparent.as_deref()));
                    ctx.claimed = Some(claim.notice_id);
                }
                Err(failed) => {
                    // Unclaimed, nothing changed: the window goes alone.
                    ctx.down = true;
                    // A COMMIT whose answer was lost may have claimed: undone
                    // by its notice id first, or the window waits (its events
                    // may be the claim's, sent again with its ids).
                    if let Some(id) = failed.commit_lost {
                        let r = ledger.store().unclaim(&id, false).await;
                        ledger.record(&r);
                        ledger.forget(user);
                        if r.is_err() && !closed.events.is_empty() {
                            let notice = closed.notice();
                            self.settle
                                .park_for_ledger(
                                    &mut closed,
                                    &notice,
                                    "the grant ledger lost the answer to a claim and could not undo it; the window waits in a retry queue (not a failed attempt)",
                                    None,
                                )
                                .await;
                            return (Ended::ParkedForLedger, true);
                        }
                    }
                }
            }
        }
        if closed.events.is_empty() {
            // A release that could not claim is not done: an accept waits
            // for it (not as a failed attempt) rather than being acked.
            return if ctx.down {
                (Ended::ParkedForLedger, true)
            } else {
                (Ended::Gone, false)
            };
        }
        let carried = self
            .openid_both_ways(ledger, user, &state.openid, &mut closed, !no_call)
            .await;
        let notice = closed.notice();
        if !ctx.down {
            match plan {
                Plan::HoldWithoutCall => {
                    self.metrics().ledger_calls_saved.inc();
                    let ended = match self
                        .hold(
                            &mut ctx,
                            &mut closed,
                            &notice,
                            HoldReason::NoCredit,
                            None,
                            carried.as_deref(),
                        )
                        .await
                    {
                        OnHold::Held => Ended::Held,
                        _ => Ended::ParkedForLedger,
                    };
                    return (self.after(&mut ctx, &closed, ended).await, false);
                }
                Plan::Call if state.credit.exact && state.credit.count == 0 => {
                    info!(assignee = %user, "credit probe: one real call for a user held at an exact 0");
                    let probed = ledger.store().probed(user, ledger.template_id()).await;
                    ledger.record(&probed);
                    ledger.update(user, |s| s.probed_at = std::time::Instant::now());
                }
                Plan::Call => {}
            }
        }
        let ended = self.send(&mut closed, notice, Some(&mut ctx)).await;
        let left_out = ctx.down;
        (self.after(&mut ctx, &closed, ended).await, left_out)
    }

    /// Acks the copies of events the ledger holds or released (a crash or
    /// a lost ack after the ledger's write, a retry copy of an event whose
    /// notice the ledger took) and takes them out of the window; held ones
    /// are covered by the held part of the notice. When the ledger cannot
    /// tell, the copies wait in a retry queue instead.
    async fn ack_known(&self, ledger: &Ledger, closed: &mut Closed<Pending>) {
        let ids: Vec<String> = closed.events.iter().map(|e| e.event_id.clone()).collect();
        let known = ledger.store().known(&ids).await;
        ledger.record(&known);
        let Ok(known) = known else {
            self.park_copies(closed).await;
            return;
        };
        if known.is_empty() {
            return;
        }
        let take: Vec<bool> = closed
            .events
            .iter()
            .map(|e| known.contains(&e.event_id))
            .collect();
        for (_, p) in &mut closed.split_off(&take).deliveries {
            p.ack();
        }
        info!(event_ids = %known.join(","), "acked: redelivered copies of events the ledger already has");
    }

    /// The ledger cannot be read: whether it holds the events of the
    /// window's copies (redelivered, or back from a retry queue) is
    /// unknown, so they are neither sent (a second notice with other ids)
    /// nor acked; they wait in a retry queue, not as a failed attempt.
    async fn park_copies(&self, closed: &mut Closed<Pending>) {
        let take: Vec<bool> = (0..closed.events.len())
            .map(|i| closed.deliveries.iter().any(|(d, p)| *d == i && a_copy(p)))
            .collect();
        if !take.contains(&true) {
            return;
        }
        let mut copies = closed.split_off(&take);
        let notice = copies.notice();
        self.settle
            .park_for_ledger(
                &mut copies,
                &notice,
                "the grant ledger is unavailable; a copy of an event it may hold waits in a retry queue (not a failed attempt)",
                None,
            )
            .await;
    }

    /// The ledger remembers the openid the window carries; a window without
    /// one carries the ledger's (so the cloud function and the direct mode
    /// reach the user without a lookup of their own). Without `write`, a new
    /// openid is returned for the hold's statement to write instead.
    async fn openid_both_ways(
        &self,
        ledger: &Ledger,
        user: &str,
        known: &Option<String>,
        closed: &mut Closed<Pending>,
        write: bool,
    ) -> Option<String> {
        let carried = closed
            .events
            .iter()
            .rev()
            .find_map(|e| e.assignee.openid.clone());
        match carried {
            // PostgreSQL's text cannot hold U+0000: such an openid is used
            // for this notice but not remembered.
            Some(openid) if openid.contains('\0') => {}
            Some(openid) if known.as_deref() != Some(openid.as_str()) => {
                if !write {
                    return Some(openid);
                }
                let r = ledger
                    .remember_openid(user.to_string(), openid.clone())
                    .await;
                if r.is_ok() {
                    ledger.update(user, |s| s.openid = Some(openid));
                }
            }
            Some(_) => {}
            None => {
                if let Some(openid) = known {
                    for e in &mut closed.events {
                        e.assignee.openid = Some(openid.clone());
                    }
                }
            }
        }
        None
    }

    /// Called with each judged answer of a notice's loop: a `43101`, or no
    /// openid in the direct mode, holds the notice.
    pub(crate) async fn hold_on(
        &self,
        ctx: &mut LedgerCtx,
        closed: &mut Closed<Pending>,
        notice: &Notice,
        result: &CallResult,
    ) -> OnHold {
        let reason = match result.outcome {
            Outcome::Rejected if result.errcode == Some(NO_CREDIT) => HoldReason::NoCredit,
            Outcome::NoOpenid => HoldReason::NoOpenid,
            _ => return OnHold::NotAHold,
        };
        if ctx.down {
            return self.park_for_ledger(closed, notice, result.errcode).await;
        }
        let guard = matches!(reason, HoldReason::NoCredit).then_some(ctx.version);
        self.hold(ctx, closed, notice, reason, guard, None).await
    }

    /// Writes the notice's events to the ledger (one statement, which also
    /// remembers `openid` and records the signals confirmed meanwhile), then
    /// acks their deliveries. A credit counted since the notice read the
    /// ledger sends it again instead; a ledger that fails parks it (not an
    /// attempt).
    async fn hold(
        &self,
        ctx: &mut LedgerCtx,
        closed: &mut Closed<Pending>,
        notice: &Notice,
        reason: HoldReason,
        guard: Option<i64>,
        openid: Option<&str>,
    ) -> OnHold {
        let ledger = ctx.ledger.clone();
        let window = to_hold(closed);
        let errcode = matches!(reason, HoldReason::NoCredit).then_some(NO_CREDIT as i32);
        let confirmed = ledger.take_confirmed();
        let done = ledger
            .hold(HoldArgs {
                user_id: ctx.user.clone(),
                notice_id: ctx.claimed.clone().unwrap_or_default(),
                events: window,
                reason: reason.as_str(),
                errcode,
                guard_version: guard,
                openid: openid.map(str::to_string),
                confirmed: confirmed.clone(),
            })
            .await;
        if done.is_err() {
            // Not written: they wait for the next statement.
            for (user, template) in confirmed {
                ledger.signal_confirmed(user, template);
            }
        }
        match done {
            Ok(HoldDone::CreditCounted) => {
                info!(notice_id = %notice.notice_id, "a credit was counted while the notice was in flight: sending it again");
                ledger.forget(&ctx.user);
                if let Ok(s) = ledger.user(&ctx.user).await {
                    ctx.version = s.credit.version;
                }
                OnHold::SendAgain
            }
            Ok(HoldDone::Held {
                new_spell,
                held,
                oldest,
            }) => {
                // Written, now acked: never before.
                self.settle.ack_held(closed);
                ctx.claimed = None;
                self.metrics().ledger_hold(reason.as_str());
                ledger.update(&ctx.user, |s| {
                    s.held = held;
                    if let Some(openid) = openid {
                        s.openid = Some(openid.to_string());
                    }
                    if guard.is_some() {
                        s.credit = rules::Credit {
                            count: 0,
                            exact: true,
                            version: s.credit.version,
                        };
                        s.probed_at = std::time::Instant::now();
                    }
                });
                info!(
                    notice_id = %notice.notice_id,
                    assignee = %ctx.user,
                    reason = reason.as_str(),
                    event_ids = %notice.event_ids.join(","),
                    held,
                    "notice held until the user's next accept"
                );
                if new_spell {
                    self.signal_held(&ledger, &ctx.user, reason.as_str(), held, oldest);
                }
                if rules::over_limit(held, ledger.settings().hold_max_events) > 0 {
                    let this = self.me();
                    tokio::spawn(async move { this.drop_from_ledger(false).await });
                }
                OnHold::Held
            }
            Err(_) => {
                self.park_for_ledger(closed, notice, errcode.map(i64::from))
                    .await
            }
        }
    }

    /// Window events of a claimed notice expired before its call and the
    /// notice goes with the rest as `now`: the claim follows it (marked
    /// with the new id, the expired events' window rows gone), so a notice
    /// sent again for it carries the same ids (section 8.8). `false`: the
    /// ledger did not answer, and the notice must not go under another id.
    pub(crate) async fn follow_claim(
        &self,
        ctx: &mut LedgerCtx,
        before: &Notice,
        now: &Notice,
    ) -> bool {
        let Some(from) = ctx.claimed.clone() else {
            return true;
        };
        if ctx.down || from == now.notice_id {
            return true;
        }
        let expired: Vec<String> = before
            .event_ids
            .iter()
            .filter(|id| !now.event_ids.contains(id))
            .cloned()
            .collect();
        let r = ctx
            .ledger
            .store()
            .reclaim(&from, &now.notice_id, &expired)
            .await;
        ctx.ledger.record(&r);
        if r.is_err() {
            return false;
        }
        ctx.claimed = Some(now.notice_id.clone());
        true
    }

    /// Parks a notice the ledger could not take, as not a failed attempt.
    async fn park_for_ledger(
        &self,
        closed: &mut Closed<Pending>,
        notice: &Notice,
        errcode: Option<i64>,
    ) -> OnHold {
        self.settle
            .park_for_ledger(
                closed,
                notice,
                "the grant ledger is unavailable; the notice waits in a retry queue (not a failed attempt)",
                errcode,
            )
            .await;
        OnHold::Parked
    }

    /// What the ledger learns from how a notice ended.
    async fn after(&self, ctx: &mut LedgerCtx, closed: &Closed<Pending>, ended: Ended) -> Ended {
        let ledger = ctx.ledger.clone();
        if ctx.down {
            return ended;
        }
        let template = ledger.template_id().to_string();
        match &ended {
            Ended::Accepted => {
                let id = ctx.claimed.clone().unwrap_or_else(|| closed.notice_id());
                let state = ledger.user(&ctx.user).await.ok();
                let counts = state
                    .as_ref()
                    .is_none_or(|s| s.credit.exact || s.credit.count > 0);
                if ctx.claimed.is_none() && !counts {
                    // A lower bound of 0 stays 0: nothing to write.
                    return ended;
                }
                if closed.held > 0 {
                    self.metrics().ledger_releases.inc();
                }
                ledger.update(&ctx.user, |s| {
                    s.credit = rules::after_accept(s.credit);
                    s.held = 0;
                });
                let this = self.me();
                let user = ctx.user.clone();
                // Acked whatever the ledger answers; its update is retried.
                tokio::spawn(async move { this.spent(user, template, id).await });
            }
            Ended::Held => {}
            Ended::Parked | Ended::ParkedForLedger | Ended::Gone => {
                if let Some(id) = ctx.claimed.take() {
                    let r = ledger.store().unclaim(&id, ctx.stale).await;
                    ledger.record(&r);
                    ledger.forget(&ctx.user);
                }
            }
            Ended::DeadLettered(reason, result) => {
                if let Some(id) = ctx.claimed.take() {
                    let r = ledger.store().unclaim(&id, ctx.stale).await;
                    ledger.record(&r);
                    ledger.forget(&ctx.user);
                    if r.is_ok() {
                        let held: Vec<&AssignmentEvent> =
                            closed.events[..closed.held].iter().collect();
                        for e in held {
                            self.dead_letter_held(
                                &ledger,
                                &ctx.user,
                                &e.event_id,
                                *reason,
                                result.errcode,
                                &result.detail,
                            )
                            .await;
                        }
                    }
                }
            }
        }
        ended
    }

    /// A notice held for a configuration fault, re-sent by a new session
    /// before it consumes, was accepted: recorded as any accepted notice is
    /// (the credit spent once by the claim's notice id, the claimed events
    /// released), once here, so what comes back from the queue finds them
    /// settled; if the ledger does not answer, retried in the background.
    pub(crate) async fn resent_in_ledger(&self, claim: HeldClaim, notice_id: &str) {
        let Some(ledger) = self.ledger.clone() else {
            return;
        };
        let id = claim.claimed.unwrap_or_else(|| notice_id.to_string());
        let template = ledger.template_id().to_string();
        let r = ledger.accepted(id.clone(), claim.user.clone()).await;
        ledger.forget(&claim.user);
        match r {
            Ok(spent) => self.credits_low(&claim.user, &template, spent).await,
            Err(e) => {
                warn!(notice_id = %id, error = %e, "recording the accepted re-send in the ledger failed; retrying");
                let this = self.me();
                tokio::spawn(async move { this.spent(claim.user, template, id).await });
            }
        }
    }

    /// Publishes `notifier.credits_low` when an accepted notice left the
    /// count low.
    async fn credits_low(&self, user: &str, template: &str, spent: Spent) {
        let Some(ledger) = &self.ledger else { return };
        if let Some(c) = spent.credit {
            if rules::credits_low(c, ledger.settings().credits_low) {
                self.signal(
                    "credits_low",
                    json!({"user_id": user, "template_id": template, "credits": c.count}),
                )
                .await;
            }
        }
    }

    /// Records an accepted notice in the ledger (decrement once per notice
    /// id, its claimed events released), retrying until the ledger answers;
    /// then publishes `notifier.credits_low` when the count is low.
    async fn spent(self: Arc<Self>, user: String, template: String, notice_id: String) {
        let Some(ledger) = self.ledger.clone() else {
            return;
        };
        let mut wait = std::time::Duration::from_millis(500);
        loop {
            let r = ledger.accepted(notice_id.clone(), user.clone()).await;
            match r {
                Ok(spent) => {
                    self.credits_low(&user, &template, spent).await;
                    return;
                }
                Err(e) => {
                    warn!(notice_id = %notice_id, error = %e, "recording an accepted notice in the ledger failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(30));
                }
            }
        }
    }

    /// A `subscription.changed` event, in its user's lane: counted once by
    /// event id; an accept releases the user's held events (with `window`,
    /// the user's open window, closed for it). Acked once the credit is
    /// recorded and the release delivered or held again.
    pub async fn subscription(
        &self,
        event: SubscriptionEvent,
        mut pending: Pending,
        window: Option<Closed<Pending>>,
        ticket: super::lanes::Ticket,
    ) {
        let _turn = ticket.wait().await;
        let Some(ledger) = self.ledger.clone() else {
            self.settle
                .dead_letter_one(
                    pending,
                    Reason::NoLedger,
                    "a subscription event reached a replica with the grant ledger off (NOTIFIER_LEDGER_URL unset); replay it once the ledger is on".into(),
                )
                .await;
            return;
        };
        let status = match event.status {
            SubscriptionStatus::Accept => Status::Accept,
            SubscriptionStatus::Reject => Status::Reject,
            SubscriptionStatus::Off => Status::Off,
        };
        let counted = ledger
            .store()
            .subscription(
                &event.event_id,
                &event.user_id,
                &event.template_id,
                event.openid.as_deref(),
                status,
            )
            .await;
        ledger.record(&counted);
        let counted = match counted {
            Ok(c) => c,
            Err(_) => {
                self.settle
                    .park_one_unattempted(
                        pending,
                        self.settle.rules().rung(0),
                        "the grant ledger is unavailable; the subscription event waits in a retry queue (not a failed attempt)".into(),
                    )
                    .await;
                if let Some(w) = window {
                    self.deliver_ledgered(&ledger, &event.user_id, w).await;
                }
                return;
            }
        };
        if event.template_id == ledger.template_id() {
            // What the statement answered is the user's state now: the
            // notices that follow need no read of their own.
            ledger.put(
                &event.user_id,
                crate::ledger::UserState {
                    credit: counted.credit,
                    openid: counted.openid.clone(),
                    held: counted.held,
                    probed_at: std::time::Instant::now(),
                },
            );
        }
        info!(
            event_id = %event.event_id,
            user = %event.user_id,
            status = status.as_str(),
            counted = counted.counted,
            credits = counted.credit.count,
            exact = counted.credit.exact,
            held = counted.held,
            "subscription event recorded"
        );
        let ours = event.template_id == ledger.template_id();
        let release = ours
            && status == Status::Accept
            && rules::should_release(counted.credit, counted.held, false);
        if !release && window.is_none() {
            pending.ack();
            return;
        }
        let window = window.unwrap_or_else(empty_window);
        let (span, otel) =
            self.release_span(&event.user_id, &window, pending.trace.as_deref().copied());
        let sent = self
            .deliver_with_held(&ledger, &event.user_id, window)
            .instrument(span);
        let (ended, left_out) = crate::trace::within(otel.as_ref(), sent).await;
        // The window went without the held events (the ledger did not
        // answer): the release is not done, the accept waits for it.
        let ended = match ended {
            Ended::Parked => Ended::Parked,
            _ if release && left_out => Ended::ParkedForLedger,
            ended => ended,
        };
        self.end_span(otel, &ended);
        match ended {
            Ended::Parked => {
                self.settle
                    .park_one(
                        pending,
                        "the release of the user's held events failed for now; the accept comes back to try again".into(),
                    )
                    .await;
            }
            // Counted already (by event id): it comes back only to release.
            Ended::ParkedForLedger => {
                self.settle
                    .park_one_unattempted(
                        pending,
                        self.settle.rules().rung(0),
                        "the grant ledger could not take the release of the user's held events; the accept waits in a retry queue (not a failed attempt)".into(),
                    )
                    .await;
            }
            _ => {
                pending.ack();
            }
        }
    }

    /// Publishes `notifier.notice_held` for a new spell of holding, and
    /// records the broker's confirm (the sweep publishes it again until then).
    fn signal_held(
        &self,
        ledger: &Arc<Ledger>,
        user: &str,
        reason: &str,
        held: u64,
        oldest: chrono::DateTime<chrono::Utc>,
    ) {
        let this = self.me();
        let ledger = ledger.clone();
        let (user, reason) = (user.to_string(), reason.to_string());
        // The hold's span goes with the task: the signal names it.
        tokio::spawn(crate::trace::carry(async move {
            let template = ledger.template_id().to_string();
            let body = json!({
                "user_id": user,
                "template_id": template,
                "reason": reason,
                "held_events": held,
                "oldest_held_at": oldest.to_rfc3339_opts(SecondsFormat::Secs, true),
            });
            if this.signal("notice_held", body).await {
                ledger.signal_confirmed(user, template);
            }
        }));
    }

    /// Publishes one signal to the CRM (confirmed; never holds up a delivery).
    pub(crate) async fn signal(&self, name: &'static str, body: serde_json::Value) -> bool {
        let key = format!("notifier.{name}");
        let confirmed = self
            .settle
            .publish_signal(&self.settings.exchange, &key, &body)
            .await;
        self.metrics().signal(name, confirmed);
        confirmed
    }

    /// Dead-letters one held event from its stored body (confirmed), then
    /// takes it out of the ledger: a crash between the two repeats the copy.
    async fn dead_letter_held(
        &self,
        ledger: &Ledger,
        user: &str,
        event_id: &str,
        reason: Reason,
        errcode: Option<i64>,
        detail: &str,
    ) -> bool {
        let rows = ledger.store().held_of(user).await;
        ledger.record(&rows);
        let Ok(rows) = rows else { return false };
        let Some((_, row)) = rows.into_iter().find(|(_, r)| r.event_id == event_id) else {
            return true;
        };
        if row.claimed_by.is_some() {
            // Claimed again, or a sweep is dead-lettering it: not ours now.
            return true;
        }
        self.dead_letter_row(ledger, &row, reason, errcode, detail)
            .await
    }

    async fn dead_letter_row(
        &self,
        ledger: &Ledger,
        row: &HeldRow,
        reason: Reason,
        errcode: Option<i64>,
        detail: &str,
    ) -> bool {
        let by = row.claimed_by.as_deref();
        if !self
            .settle
            .dead_letter_body(row, reason, errcode, detail)
            .await
        {
            // The sweep's mark goes: the event stays held, unclaimed.
            if let Some(by) = by {
                let r = ledger.store().unmark(&row.event_id, by).await;
                ledger.record(&r);
            }
            return false;
        }
        let r = ledger.store().dropped(&row.event_id, by).await;
        ledger.record(&r);
        r.is_ok()
    }

    /// The sweep's dead letters: events held past `NOTIFIER_HOLD_FOR`
    /// (`no_subscription`) and beyond `NOTIFIER_HOLD_MAX_EVENTS` (`hold_full`),
    /// marked as this sweep's in the statement that finds them (a release
    /// leaves them). Nothing expires while a configuration fault is held.
    pub(crate) async fn drop_from_ledger(self: Arc<Self>, expire: bool) {
        let Some(ledger) = self.ledger.clone() else {
            return;
        };
        let s = ledger.settings().clone();
        let expire = expire && !self.fault_held();
        let found = ledger
            .store()
            .to_drop(s.hold_for, s.hold_max_events, 500, expire)
            .await;
        ledger.record(&found);
        let Ok((expired, over)) = found else { return };
        let mut users = Vec::new();
        for (user, row) in &expired {
            let errcode = row.errcode.map(i64::from);
            let detail = format!(
                "held {} for want of {} with no accept (NOTIFIER_HOLD_FOR)",
                crate::settings::format_duration(s.hold_for),
                if row.reason == "no_openid" {
                    "an openid"
                } else {
                    "a subscription credit"
                }
            );
            if self
                .dead_letter_row(&ledger, row, Reason::NoSubscription, errcode, &detail)
                .await
            {
                self.metrics().ledger_expiry(Reason::NoSubscription, 1);
                users.push(user.clone());
            }
        }
        for (user, row) in &over {
            let detail = format!(
                "the user's held events passed NOTIFIER_HOLD_MAX_EVENTS ({}); the oldest go",
                s.hold_max_events
            );
            let errcode = row.errcode.map(i64::from);
            if self
                .dead_letter_row(&ledger, row, Reason::HoldFull, errcode, &detail)
                .await
            {
                self.metrics().ledger_expiry(Reason::HoldFull, 1);
                users.push(user.clone());
            }
        }
        for u in users {
            ledger.forget(&u);
        }
    }

    /// One sweep pass (on the replica holding the sweep's advisory lock):
    /// expiry and the hold limit, signals not yet confirmed, releases due
    /// (a count above 0 or a lower bound, or the credit probe), old ids and
    /// idle users forgotten, the gauges refreshed. `active`: this replica
    /// consumes the queue (only the active replica calls WeChat).
    pub async fn sweep(self: Arc<Self>, active: bool) {
        let Some(ledger) = self.ledger.clone() else {
            return;
        };
        let this = self.clone();
        let l = ledger.clone();
        let pass = ledger
            .store()
            .with_sweep_lock(|| async move {
                // Expiry only on the active replica: a standby cannot see the
                // active one's held configuration fault (nothing expires then).
                this.clone().drop_from_ledger(active).await;
                if let Ok(spells) = l.store().unconfirmed_spells().await {
                    for (user, template, reason, held, oldest) in spells {
                        if held == 0 {
                            continue;
                        }
                        let body = json!({
                            "user_id": user, "template_id": template, "reason": reason,
                            "held_events": held,
                            "oldest_held_at": oldest.to_rfc3339_opts(SecondsFormat::Secs, true),
                        });
                        if this.signal("notice_held", body).await {
                            l.signal_confirmed(user, template);
                        }
                    }
                }
                let r = l.store().forget_old(l.settings().hold_for).await;
                l.record(&r);
                if let Ok((events, users, old)) = l.store().totals().await {
                    let m = this.metrics();
                    m.ledger_held_events.set(events as i64);
                    m.ledger_held_users.set(users as i64);
                    m.ledger_held_users_over_a_day.set(old as i64);
                }
                if !active {
                    return Vec::new();
                }
                let Ok(users) = l.store().held_users(1000).await else {
                    return Vec::new();
                };
                users
                    .into_iter()
                    .filter(|u| {
                        u.template_id == l.template_id()
                            && rules::should_release(
                                u.credit,
                                u.held,
                                u.since_probe >= l.settings().credit_probe,
                            )
                    })
                    .map(|u| u.user_id)
                    .collect::<Vec<_>>()
            })
            .await;
        ledger.record(&pass);
        // The releases run inside this task, after the lock's transaction:
        // when the session ends its sweep task is aborted, and with it these
        // (a replica that lost the queue must not call WeChat beside the new
        // active one).
        let mut releases = tokio::task::JoinSet::new();
        for user in pass.ok().flatten().unwrap_or_default() {
            let ticket = self.lanes.ticket(&user);
            let (d, l) = (self.clone(), ledger.clone());
            releases.spawn(async move {
                let _turn = ticket.wait().await;
                d.deliver_ledgered(&l, &user, empty_window()).await;
            });
        }
        while releases.join_next().await.is_some() {}
    }
}

impl LedgerCtx {
    /// What a re-send of this notice by a later session must tell the
    /// ledger (`None`: the ledger did not answer, nothing to tell).
    pub(crate) fn held_claim(&self) -> Option<HeldClaim> {
        (!self.down).then(|| HeldClaim {
            user: self.user.clone(),
            claimed: self.claimed.clone(),
        })
    }

    /// A context for a release sent on its own (a notice of held events).
    fn clone_for_release(&self) -> LedgerCtx {
        LedgerCtx {
            ledger: self.ledger.clone(),
            user: self.user.clone(),
            version: self.version,
            claimed: None,
            down: self.down,
            stale: false,
        }
    }
}
