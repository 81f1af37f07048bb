//! The Prometheus metrics of contract section 6, in one registry. Labels come
//! from small fixed sets (reasons, outcomes, errcodes), never from user ids,
//! customer names or tokens.

use std::sync::atomic::AtomicI64;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::reason::Reason;

type Labels = Vec<(&'static str, String)>;

/// Every metric the service exports. Cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub events_received: Counter,
    events_invalid: Family<Labels, Counter>,
    notices_sent: Family<Labels, Counter>,
    pub events_per_notice: Histogram,
    wechat_calls: Family<Labels, Counter>,
    wechat_call_duration: Family<Labels, Histogram>,
    pub rate_limiter_wait: Histogram,
    retries: Family<Labels, Counter>,
    dead_letters: Family<Labels, Counter>,
    pub open_windows: Gauge<i64, AtomicI64>,
    pub unacked_deliveries: Gauge<i64, AtomicI64>,
    token_fetches: Family<Labels, Counter>,
    pub consuming: Gauge<i64, AtomicI64>,
    /// 1 while a configuration fault keeps this replica from calling WeChat.
    pub config_fault: Gauge<i64, AtomicI64>,
    /// The grant ledger (contract section 8.7).
    pub ledger_held_events: Gauge<i64, AtomicI64>,
    pub ledger_held_users: Gauge<i64, AtomicI64>,
    pub ledger_held_users_over_a_day: Gauge<i64, AtomicI64>,
    pub ledger_holds: Family<Labels, Counter>,
    pub ledger_releases: Counter,
    pub ledger_calls_saved: Counter,
    pub ledger_expiries: Family<Labels, Counter>,
    pub ledger_errors: Counter,
    pub ledger_statement: Histogram,
    pub signals: Family<Labels, Counter>,
    quota_pauses: Family<Labels, Counter>,
    /// Brought up to `telemetry::log_lines_dropped` at each `encode`.
    log_lines_dropped: Counter,
    /// Brought up to `trace::malformed_count` at each `encode`.
    traceparent_malformed: Counter,
    /// Brought up to `trace::lost_count` at each `encode`.
    spans_lost: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wechat_notifier");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            events_received: Counter::default(),
            events_invalid: Family::default(),
            notices_sent: Family::default(),
            events_per_notice: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            wechat_calls: Family::default(),
            wechat_call_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 14))
            }),
            rate_limiter_wait: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            retries: Family::default(),
            dead_letters: Family::default(),
            open_windows: Gauge::default(),
            unacked_deliveries: Gauge::default(),
            token_fetches: Family::default(),
            consuming: Gauge::default(),
            config_fault: Gauge::default(),
            quota_pauses: Family::default(),
            log_lines_dropped: Counter::default(),
            traceparent_malformed: Counter::default(),
            spans_lost: Counter::default(),
            ledger_held_events: Gauge::default(),
            ledger_held_users: Gauge::default(),
            ledger_held_users_over_a_day: Gauge::default(),
            ledger_holds: Family::default(),
            ledger_releases: Counter::default(),
            ledger_calls_saved: Counter::default(),
            ledger_expiries: Family::default(),
            ledger_errors: Counter::default(),
            ledger_statement: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            signals: Family::default(),
        };
        registry.register(
            "events_received",
            "customer.assigned deliveries received",
            m.events_received.clone(),
        );
        registry.register(
            "events_invalid",
            "deliveries dead-lettered as invalid, by reason",
            m.events_invalid.clone(),
        );
        registry.register(
            "notices_sent",
            "notices accepted by WeChat, by whether they summarise several events",
            m.notices_sent.clone(),
        );
        registry.register(
            "events_per_notice",
            "distinct events covered by one accepted notice",
            m.events_per_notice.clone(),
        );
        registry.register(
            "wechat_calls",
            "calls to the WeChat API, by api, outcome and errcode",
            m.wechat_calls.clone(),
        );
        registry.register_with_unit(
            "wechat_call_duration",
            "duration of WeChat API calls",
            prometheus_client::registry::Unit::Seconds,
            m.wechat_call_duration.clone(),
        );
        registry.register_with_unit(
            "rate_limiter_wait",
            "time a call waited for the fleet-wide rate budget",
            prometheus_client::registry::Unit::Seconds,
            m.rate_limiter_wait.clone(),
        );
        registry.register(
            "retries",
            "deliveries parked in a retry queue, by reason",
            m.retries.clone(),
        );
        registry.register(
            "dead_letters",
            "deliveries dead-lettered, by reason",
            m.dead_letters.clone(),
        );
        registry.register(
            "open_windows",
            "assignee windows currently open",
            m.open_windows.clone(),
        );
        registry.register(
            "unacked_deliveries",
            "deliveries held unacked by this replica",
            m.unacked_deliveries.clone(),
        );
        registry.register(
            "token_fetches",
            "access token fetches, by mode and outcome",
            m.token_fetches.clone(),
        );
        registry.register(
            "consuming",
            "1 while this replica has a registered consumer",
            m.consuming.clone(),
        );
        registry.register(
            "config_fault",
            "1 while a configuration fault (bad secret, unknown env or function, template not configured, …) holds this replica",
            m.config_fault.clone(),
        );
        registry.register(
            "quota_pauses",
            "pauses of every WeChat call after a quota errcode, by quota (minute = 45011, daily = 45009)",
            m.quota_pauses.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "log lines dropped because stderr did not keep up (the process never waits for it)",
            m.log_lines_dropped.clone(),
        );
        registry.register(
            "traceparent_malformed",
            "deliveries whose traceparent header was malformed (ignored: the event is handled as one without trace context)",
            m.traceparent_malformed.clone(),
        );
        registry.register(
            "spans_lost",
            "spans in batches the OTLP collector did not take (unreachable or refusing); deliveries never wait on it",
            m.spans_lost.clone(),
        );
        registry.register(
            "ledger_held_events",
            "events held in the grant ledger for want of a credit or an openid",
            m.ledger_held_events.clone(),
        );
        registry.register(
            "ledger_held_users",
            "users with held events",
            m.ledger_held_users.clone(),
        );
        registry.register(
            "ledger_held_users_over_a_day",
            "users whose oldest held event is older than 24 hours",
            m.ledger_held_users_over_a_day.clone(),
        );
        registry.register(
            "ledger_holds",
            "notices held in the ledger, by reason (no_credit, no_openid)",
            m.ledger_holds.clone(),
        );
        registry.register(
            "ledger_releases",
            "notices that delivered held events",
            m.ledger_releases.clone(),
        );
        registry.register(
            "ledger_calls_saved",
            "notices held without a call because the ledger knew an exact 0",
            m.ledger_calls_saved.clone(),
        );
        registry.register(
            "ledger_expiries",
            "held events dead-lettered, by reason (no_subscription, hold_full)",
            m.ledger_expiries.clone(),
        );
        registry.register(
            "ledger_errors",
            "ledger statements that failed (unreachable, or an error)",
            m.ledger_errors.clone(),
        );
        registry.register_with_unit(
            "ledger_statement_duration",
            "duration of ledger statements",
            prometheus_client::registry::Unit::Seconds,
            m.ledger_statement.clone(),
        );
        registry.register(
            "signals",
            "signals published to the CRM, by signal and outcome",
            m.signals.clone(),
        );
        *m.registry.lock().expect("fresh mutex") = registry;
        m
    }

    pub fn ledger_hold(&self, reason: &'static str) {
        self.ledger_holds
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    pub fn ledger_expiry(&self, reason: Reason, n: u64) {
        self.ledger_expiries
            .get_or_create(&vec![("reason", reason.as_str().to_string())])
            .inc_by(n);
    }

    pub fn signal(&self, signal: &'static str, confirmed: bool) {
        let outcome = if confirmed { "confirmed" } else { "failed" };
        self.signals
            .get_or_create(&vec![
                ("signal", signal.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Under the registry's lock: two encodes never add the same lines twice.
        let dropped = crate::telemetry::log_lines_dropped();
        let counted = self.log_lines_dropped.get();
        if dropped > counted {
            self.log_lines_dropped.inc_by(dropped - counted);
        }
        for (now, counter) in [
            (crate::trace::malformed_count(), &self.traceparent_malformed),
            (crate::trace::lost_count(), &self.spans_lost),
        ] {
            let counted = counter.get();
            if now > counted {
                counter.inc_by(now - counted);
            }
        }
        encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }

    pub fn event_invalid(&self, reason: &str) {
        self.events_invalid
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    pub fn notice_sent(&self, summary: bool, events: usize) {
        self.notices_sent
            .get_or_create(&vec![("summary", summary.to_string())])
            .inc();
        self.events_per_notice.observe(events as f64);
    }

    pub fn wechat_call(&self, api: &str, outcome: &str, errcode: Option<i64>, seconds: f64) {
        let code = errcode_label(errcode);
        self.wechat_calls
            .get_or_create(&vec![
                ("api", api.to_string()),
                ("outcome", outcome.to_string()),
                ("errcode", code),
            ])
            .inc();
        self.wechat_call_duration
            .get_or_create(&vec![("api", api.to_string())])
            .observe(seconds);
    }

    pub fn retry(&self, reason: &str, n: u64) {
        self.retries
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc_by(n);
    }

    pub fn dead_letter(&self, reason: Reason, n: u64) {
        self.dead_letters
            .get_or_create(&vec![("reason", reason.as_str().to_string())])
            .inc_by(n);
    }

    pub fn quota_pause(&self, quota: &'static str) {
        self.quota_pauses
            .get_or_create(&vec![("quota", quota.to_string())])
            .inc();
    }

    pub fn token_fetch(&self, mode: &str, outcome: &str) {
        self.token_fetches
            .get_or_create(&vec![
                ("mode", mode.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }
}

/// The `errcode` label: a code of the contract's table as itself, any other
/// as `other`, no errcode as `none`. A reply can carry any integer, and each
/// distinct label value is a new time series, so the set must stay small.
fn errcode_label(errcode: Option<i64>) -> String {
    match errcode {
        None => "none".into(),
        Some(c) if crate::wechat::outcome::is_known(c) => c.to_string(),
        Some(_) => "other".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errcode_labels_stay_within_the_table() {
        assert_eq!(errcode_label(None), "none");
        assert_eq!(errcode_label(Some(45011)), "45011");
        assert_eq!(errcode_label(Some(-501000)), "-501000");
        assert_eq!(errcode_label(Some(123_456_789)), "other");
        assert_eq!(errcode_label(Some(i64::MIN)), "other");
    }
}
