//! The one vocabulary of dead-letter reasons: the `x-notifier-reason` header
//! words, the values `dlq --reason` accepts, and the `reason` label of the
//! dead-letter metric all come from this enum, so they cannot drift apart.

use std::fmt;
use std::str::FromStr;

/// Why a message is in the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The event broke a rule of the schema (never retried).
    InvalidEvent,
    /// WeChat refused the notice for this recipient (40003, 43101, …).
    WechatRejected,
    /// The cloud function kept throwing (-504002) until the ladder ran out.
    FunctionFailed,
    /// Direct mode, and the event carries no `assignee.openid`.
    NoOpenid,
    /// Transient failures or the daily quota outlasted `NOTIFIER_MAX_ATTEMPTS`.
    RetriesExhausted,
    /// The event was older than `NOTIFIER_MAX_AGE` when it would be sent.
    Expired,
    /// The broker dead-lettered it itself (the work queue's delivery limit);
    /// such a message carries no `x-notifier-*` header.
    DeliveryLimit,
    /// Grant ledger: the event was held longer than `NOTIFIER_HOLD_FOR` waiting
    /// for an accept (a credit, or for the direct mode an openid).
    NoSubscription,
    /// Grant ledger: the user already held `NOTIFIER_HOLD_MAX_EVENTS` events;
    /// the oldest leave this way.
    HoldFull,
    /// A `subscription.changed` event reached a replica with the ledger off
    /// (a binding left by an earlier run); replay it once the ledger is on.
    NoLedger,
}

impl Reason {
    /// Every reason, in the order `--help` and error messages list them.
    pub const ALL: [Reason; 10] = [
        Reason::InvalidEvent,
        Reason::WechatRejected,
        Reason::FunctionFailed,
        Reason::NoOpenid,
        Reason::RetriesExhausted,
        Reason::Expired,
        Reason::DeliveryLimit,
        Reason::NoSubscription,
        Reason::HoldFull,
        Reason::NoLedger,
    ];

    /// The machine word (header value, filter value, metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidEvent => "invalid_event",
            Reason::WechatRejected => "wechat_rejected",
            Reason::FunctionFailed => "function_failed",
            Reason::NoOpenid => "no_openid",
            Reason::RetriesExhausted => "retries_exhausted",
            Reason::Expired => "expired",
            Reason::DeliveryLimit => "delivery_limit",
            Reason::NoSubscription => "no_subscription",
            Reason::HoldFull => "hold_full",
            Reason::NoLedger => "no_ledger",
        }
    }

    /// The valid words joined by `, ` (for error messages and help).
    pub fn list() -> String {
        Self::ALL
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The reason a dead letter shows: its header, or `delivery_limit` when
    /// it has none (the broker's own dead-lettering). An unknown header word
    /// (a newer version's) is kept as `None` so callers can show it raw.
    pub fn of_header(header: Option<&str>) -> Option<Reason> {
        match header {
            None => Some(Reason::DeliveryLimit),
            Some(word) => word.parse().ok(),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is not in the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason {word:?}; expected one of: {}", Reason::list())]
pub struct UnknownReason {
    pub word: String,
}

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason { word: s.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_parses_back_to_its_reason() {
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>(), Ok(r));
        }
    }

    #[test]
    fn an_unknown_word_names_the_valid_ones() {
        let e = "invalid_evnt".parse::<Reason>().unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("invalid_evnt") && msg.contains("delivery_limit"),
            "{msg}"
        );
    }

    #[test]
    fn a_dead_letter_without_a_header_is_the_brokers_delivery_limit() {
        assert_eq!(Reason::of_header(None), Some(Reason::DeliveryLimit));
        assert_eq!(Reason::of_header(Some("expired")), Some(Reason::Expired));
        assert_eq!(Reason::of_header(Some("something_new")), None);
    }

    #[test]
    fn the_ledger_s_reasons_are_words_of_the_vocabulary() {
        // Contract section 2: the header words the grant ledger adds.
        for (word, reason) in [
            ("no_subscription", Reason::NoSubscription),
            ("hold_full", Reason::HoldFull),
            ("no_ledger", Reason::NoLedger),
        ] {
            assert_eq!(Reason::of_header(Some(word)), Some(reason));
            assert!(Reason::ALL.contains(&reason));
            assert!(Reason::list().contains(word));
        }
    }
}
