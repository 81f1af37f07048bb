//! The grant ledger (contract section 8): WeChat's one-time subscriptions are
//! a stock of credits it never lets us read, so the service counts them in
//! PostgreSQL, holds a notice that met `43101` until the user's next accept,
//! and then sends one summary of everything that waited.
//!
//! - [`rules`]: the credit rules, pure and table-tested;
//! - [`store`]: the SQL (the only file with any);
//! - `batch`: many notices' reads and accepted sends in one statement;
//! - this file: the active replica's cache of what it wrote, and the
//!   ledger's health (`/readyz`, the error metric).
//!
//! Depends on settings, metrics and the HTTP health; `dispatch` uses it.

mod batch;
pub mod rules;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::http::Health;
use crate::metrics::Metrics;
use crate::settings::LedgerSettings;
pub use rules::{Credit, Status};
pub use store::{LedgerError, Store};

/// What the active replica knows of one user: read from the ledger on first
/// use in a broker session, then kept up to date by its own writes (it is the
/// only writer of these rows besides the sweep, which touches only unclaimed
/// expired events and never a count).
#[derive(Debug, Clone)]
pub struct UserState {
    pub credit: Credit,
    pub openid: Option<String>,
    /// Held events (0: nothing to claim, no statement needed).
    pub held: u64,
    /// When the last real call for this user was (the credit probe).
    pub probed_at: Instant,
}

/// The ledger of one replica.
pub struct Ledger {
    store: Store,
    settings: LedgerSettings,
    cache: Mutex<HashMap<String, UserState>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// A statement failed and none succeeded since (what `/readyz` reports).
    down: AtomicBool,
    /// Spells whose `notifier.notice_held` the broker confirmed, not yet
    /// written: they ride along with the next hold's statement, or go in
    /// one statement of their own after [`CONFIRM_AFTER`].
    confirmed: Mutex<Confirmed>,
    /// Users read on first use, many in one statement.
    reads: batch::Batcher<String, store::UserRow>,
    /// Accepted notices (notice id, user id), many in one statement.
    spends: batch::Batcher<(String, String), store::Spent>,
    /// Openids assignment events carried (user id, openid).
    openids: batch::Batcher<(String, String), ()>,
    /// Holds, many in one transaction.
    holds: batch::Batcher<store::HoldArgs, store::HoldDone>,
}

/// Holds one transaction carries at most (its row locks last until the
/// commit).
const HOLDS_MAX: usize = 100;

/// Requests one batched statement carries at most.
const BATCH_MAX: usize = 500;

#[derive(Default)]
struct Confirmed {
    spells: Vec<(String, String)>,
    /// A task will write what is left.
    flushing: bool,
    /// When a hold's statement last took confirmations along: while holds
    /// keep coming, the next one will carry the rest.
    carried_at: Option<Instant>,
}

/// How long confirmations wait for a hold to carry them.
const CONFIRM_AFTER: Duration = Duration::from_millis(500);

impl Ledger {
    /// # Errors
    /// The URL does not parse.
    pub fn new(
        settings: &LedgerSettings,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Ledger, LedgerError> {
        let store = Store::connect(settings, Some(metrics.clone()))?;
        let (s1, s2, s3, s4) = (store.clone(), store.clone(), store.clone(), store.clone());
        let t4 = settings.template_id.clone();
        let (t1, t2) = (settings.template_id.clone(), settings.template_id.clone());
        Ok(Ledger {
            reads: batch::Batcher::new(BATCH_MAX, move |users: Vec<String>| {
                let (s, t) = (s1.clone(), t1.clone());
                async move { s.users(&users, &t).await }
            }),
            spends: batch::Batcher::new(BATCH_MAX, move |notices: Vec<(String, String)>| {
                let (s, t) = (s2.clone(), t2.clone());
                async move { s.accepted_many(&notices, &t).await }
            }),
            openids: batch::Batcher::new(BATCH_MAX, move |pairs: Vec<(String, String)>| {
                let s = s3.clone();
                async move { s.remember_openids(&pairs).await }
            }),
            holds: batch::Batcher::new(HOLDS_MAX, move |args: Vec<store::HoldArgs>| {
                let (s, t) = (s4.clone(), t4.clone());
                async move { s.hold_many(&args, &t).await }
            }),
            store,
            settings: settings.clone(),
            cache: Mutex::new(HashMap::new()),
            metrics,
            health,
            down: AtomicBool::new(false),
            confirmed: Mutex::new(Confirmed::default()),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &LedgerSettings {
        &self.settings
    }

    /// The template the ledger counts credits of (`WECHAT_TEMPLATE_ID`).
    pub fn template_id(&self) -> &str {
        &self.settings.template_id
    }

    /// Migrates the schema (before the replica consumes; a replica that
    /// cannot reach the ledger does not consume until it can).
    ///
    /// # Errors
    /// Unreachable, or a migration failed.
    pub async fn start(&self) -> Result<(), LedgerError> {
        let r = self.store.migrate().await;
        self.record(&r);
        r
    }

    /// A new broker session: the cache starts empty (a standby that takes
    /// over reads each user from the ledger on first use).
    pub fn session_started(&self) {
        self.cache.lock().expect("not poisoned").clear();
    }

    /// Notes a statement's result: the first failure marks the ledger down
    /// (`/readyz` 503 naming it), the next success clears it.
    pub fn record<T>(&self, r: &Result<T, LedgerError>) {
        match r {
            Ok(_) => {
                if self.down.swap(false, Ordering::SeqCst) {
                    info!("the ledger answers again");
                    self.health.set_ledger_problem(None);
                }
            }
            Err(e) => {
                self.metrics.ledger_errors.inc();
                if !self.down.swap(true, Ordering::SeqCst) {
                    warn!(error = %e, "the ledger is unavailable; notices go on without their held events");
                }
                self.health.set_ledger_problem(Some(e.to_string()));
            }
        }
    }

    /// Whether the last statement failed.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// The user's state: cached, or read in one statement.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn user(&self, user_id: &str) -> Result<UserState, LedgerError> {
        if let Some(s) = self.cache.lock().expect("not poisoned").get(user_id) {
            return Ok(s.clone());
        }
        let r = self.reads.call(user_id.to_string()).await;
        self.record(&r);
        let row = r?;
        let state = UserState {
            credit: row.credit,
            openid: row.openid,
            held: row.held,
            probed_at: Instant::now()
                .checked_sub(row.since_probe)
                .unwrap_or_else(Instant::now),
        };
        self.cache
            .lock()
            .expect("not poisoned")
            .insert(user_id.to_string(), state.clone());
        Ok(state)
    }

    /// Records an accepted notice (see [`Store::accepted`]), batched with
    /// the other notices accepted meanwhile.
    ///
    /// # Errors
    /// The ledger failed (the statement is idempotent: call again).
    pub async fn accepted(
        &self,
        notice_id: String,
        user_id: String,
    ) -> Result<store::Spent, LedgerError> {
        let r = self.spends.call((notice_id, user_id)).await;
        self.record(&r);
        r
    }

    /// Holds a notice's events (see [`Store::hold`]), in one transaction
    /// with the other holds that arrived meanwhile.
    ///
    /// # Errors
    /// The ledger failed (nothing is written).
    pub async fn hold(&self, args: store::HoldArgs) -> Result<store::HoldDone, LedgerError> {
        let r = self.holds.call(args).await;
        self.record(&r);
        r
    }

    /// Remembers the openid an assignment event carried, batched.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn remember_openid(
        &self,
        user_id: String,
        openid: String,
    ) -> Result<(), LedgerError> {
        let r = self.openids.call((user_id, openid)).await;
        self.record(&r);
        r
    }

    /// Changes the cached state of a user (after this replica's own write).
    pub fn update(&self, user_id: &str, f: impl FnOnce(&mut UserState)) {
        if let Some(s) = self.cache.lock().expect("not poisoned").get_mut(user_id) {
            f(s);
        }
    }

    /// Replaces a user's cached state with what a statement just answered.
    pub fn put(&self, user_id: &str, state: UserState) {
        self.cache
            .lock()
            .expect("not poisoned")
            .insert(user_id.to_string(), state);
    }

    /// Forgets a user's cached state (a write whose effect is unknown).
    pub fn forget(&self, user_id: &str) {
        self.cache.lock().expect("not poisoned").remove(user_id);
    }

    /// Records that the broker confirmed the spell's `notifier.notice_held`
    /// (user, template): with the next hold's statement, else on its own
    /// once no hold has come for [`CONFIRM_AFTER`]. A write that fails
    /// leaves the spell unconfirmed, and the sweep publishes the signal
    /// again.
    pub fn signal_confirmed(self: &Arc<Self>, user_id: String, template_id: String) {
        let mut c = self.confirmed.lock().expect("not poisoned");
        c.spells.push((user_id, template_id));
        if c.flushing {
            return;
        }
        c.flushing = true;
        let this = self.clone();
        tokio::spawn(async move {
            let mut wait = CONFIRM_AFTER;
            let spells = loop {
                tokio::time::sleep(wait).await;
                let mut c = this.confirmed.lock().expect("not poisoned");
                match c.carried_at.map(|at| at.elapsed()) {
                    Some(since) if since < CONFIRM_AFTER && !c.spells.is_empty() => {
                        wait = CONFIRM_AFTER - since;
                    }
                    _ => {
                        c.flushing = false;
                        break std::mem::take(&mut c.spells);
                    }
                }
            };
            if !spells.is_empty() {
                let r = this.store.signals_confirmed(&spells).await;
                this.record(&r);
            }
        });
    }

    /// The confirmations a hold's statement takes along.
    pub fn take_confirmed(&self) -> Vec<(String, String)> {
        let mut c = self.confirmed.lock().expect("not poisoned");
        c.carried_at = Some(Instant::now());
        std::mem::take(&mut c.spells)
    }

    /// Since the last real call for this user (for the credit probe).
    pub fn since_probe(state: &UserState) -> Duration {
        state.probed_at.elapsed()
    }
}
