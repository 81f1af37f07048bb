//! The credit rules of the grant ledger, as pure functions of their inputs
//! (no I/O, no clock): what a subscription event does to a count, whether a
//! notice is sent or held without a call, what an accepted notice or a
//! `43101` does, when a user's held events are released. `store.rs` carries
//! the same rules out in SQL; these are what its statements must agree with,
//! and they are table-tested here.

use std::time::Duration;

/// A user's credits for one template, as the ledger keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Credit {
    /// Messages WeChat will still accept (never below 0).
    pub count: i32,
    /// Known exactly (after a `43101` or an `off`), or only a lower bound:
    /// the user may hold credits from before the ledger.
    pub exact: bool,
    /// Raised by every counted accept or `off`: a hold sets an exact 0 only
    /// if no credit was counted after the notice read the ledger.
    pub version: i64,
}

/// The `status` of a `subscription.changed` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Accept,
    Reject,
    Off,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accept => "accept",
            Status::Reject => "reject",
            Status::Off => "off",
        }
    }
}

/// What a subscription event, counted for the first time, does to the count.
pub fn on_subscription(c: Credit, status: Status) -> Credit {
    match status {
        Status::Accept => Credit {
            count: c.count.saturating_add(1),
            version: c.version + 1,
            ..c
        },
        Status::Reject => c,
        Status::Off => Credit {
            count: 0,
            exact: true,
            version: c.version + 1,
        },
    }
}

/// An accepted notice spent one credit (a lower bound of 0 stays 0).
pub fn after_accept(c: Credit) -> Credit {
    Credit {
        count: (c.count - 1).max(0),
        ..c
    }
}

/// Whether a notice for this user costs a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Call WeChat.
    Call,
    /// The ledger knows an exact 0: hold without a call (no quota is spent on
    /// a certain `43101`).
    HoldWithoutCall,
}

/// Decides whether to call: an exact 0 holds without a call, except once
/// every `probe_every` (`since_probe`: how long ago the last real call for
/// this user was), in case an accept never reached the ledger.
pub fn plan(c: Credit, since_probe: Duration, probe_every: Duration) -> Plan {
    if c.exact && c.count == 0 && since_probe < probe_every {
        Plan::HoldWithoutCall
    } else {
        Plan::Call
    }
}

/// What a `43101` answer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnNoCredit {
    /// The count becomes an exact 0 and the notice is held.
    Hold,
    /// A credit was counted after the notice read the ledger: the answer may
    /// predate it, so the notice is sent again instead.
    SendAgain,
}

pub fn on_no_credit(read_version: i64, current_version: i64) -> OnNoCredit {
    if read_version == current_version {
        OnNoCredit::Hold
    } else {
        OnNoCredit::SendAgain
    }
}

/// Whether a user's held events should be sent now (an accept, a sweep):
/// there is something held and a credit that may be there (a count above 0,
/// or only a lower bound), or the credit probe is due.
pub fn should_release(c: Credit, held: u64, probe_due: bool) -> bool {
    held > 0 && (c.count > 0 || !c.exact || probe_due)
}

/// Whether `notifier.credits_low` is published after a send.
pub fn credits_low(c: Credit, low: u32) -> bool {
    c.exact && i64::from(c.count) <= i64::from(low)
}

/// How many of a user's oldest held events go to the dead-letter queue
/// (`hold_full`) so that at most `max` stay held.
pub fn over_limit(held: u64, max: u32) -> u64 {
    held.saturating_sub(u64::from(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOWER0: Credit = Credit {
        count: 0,
        exact: false,
        version: 0,
    };
    const EXACT0: Credit = Credit {
        count: 0,
        exact: true,
        version: 3,
    };

    #[test]
    fn subscription_events_change_the_count_as_section_8_says() {
        let cases = [
            (LOWER0, Status::Accept, (1, false, 1)),
            (EXACT0, Status::Accept, (1, true, 4)),
            (EXACT0, Status::Reject, (0, true, 3)),
            (
                Credit {
                    count: 5,
                    exact: false,
                    version: 7,
                },
                Status::Off,
                (0, true, 8),
            ),
        ];
        for (before, status, (count, exact, version)) in cases {
            let after = on_subscription(before, status);
            assert_eq!(
                (after.count, after.exact, after.version),
                (count, exact, version),
                "{before:?} + {status:?}"
            );
        }
    }

    #[test]
    fn an_accepted_notice_spends_one_credit_and_never_goes_below_zero() {
        let two = Credit {
            count: 2,
            exact: true,
            version: 1,
        };
        assert_eq!(after_accept(two).count, 1);
        assert!(after_accept(two).exact);
        assert_eq!(after_accept(LOWER0), LOWER0);
        assert_eq!(after_accept(EXACT0), EXACT0);
    }

    #[test]
    fn only_an_exact_zero_saves_the_call_and_the_probe_still_calls() {
        let hour = Duration::from_secs(3600);
        let minute = Duration::from_secs(60);
        assert_eq!(plan(EXACT0, minute, hour), Plan::HoldWithoutCall);
        assert_eq!(plan(EXACT0, hour, hour), Plan::Call);
        assert_eq!(plan(LOWER0, minute, hour), Plan::Call);
        let one = Credit { count: 1, ..EXACT0 };
        assert_eq!(plan(one, minute, hour), Plan::Call);
    }

    #[test]
    fn a_hold_after_a_credit_was_counted_sends_again() {
        assert_eq!(on_no_credit(3, 3), OnNoCredit::Hold);
        assert_eq!(on_no_credit(3, 4), OnNoCredit::SendAgain);
    }

    #[test]
    fn release_needs_held_events_and_a_possible_credit() {
        let one = Credit { count: 1, ..EXACT0 };
        assert!(should_release(one, 3, false));
        assert!(should_release(LOWER0, 3, false));
        assert!(!should_release(EXACT0, 3, false));
        assert!(should_release(EXACT0, 3, true));
        assert!(!should_release(one, 0, true));
    }

    #[test]
    fn credits_low_is_for_exact_counts_at_or_under_the_threshold() {
        let one = Credit { count: 1, ..EXACT0 };
        assert!(credits_low(one, 1));
        assert!(credits_low(EXACT0, 1));
        assert!(!credits_low(Credit { count: 2, ..one }, 1));
        assert!(!credits_low(LOWER0, 1));
    }

    #[test]
    fn the_hold_limit_drops_only_the_excess() {
        assert_eq!(over_limit(1000, 1000), 0);
        assert_eq!(over_limit(1003, 1000), 3);
        assert_eq!(over_limit(0, 1000), 0);
    }
}
