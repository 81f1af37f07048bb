//! The notice one assignee receives for a closed window (contract section 4):
//! the summary fields and the deterministic `notice_id`. Pure, no I/O.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;

use crate::event::{AssignSource, AssignmentEvent, Customer, Person};

/// At most this many customers are listed by name; the count is always complete.
pub const LISTED_CUSTOMERS: usize = 10;

/// What is sent to WeChat for one assignee's window.
/// (`Deserialize` too: the cloud function's shared template fixture is read back.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub notice_id: String,
    pub assignee: Person,
    pub customer_count: usize,
    pub customers: Vec<Customer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assigned_by: Option<Person>,
    pub source: AssignSource,
    pub first_assigned_at: String,
    pub last_assigned_at: String,
    pub summary: bool,
    pub event_ids: Vec<String>,
}

/// The lowercase hex SHA-256 of the event ids sorted by code point, each followed by `\n`.
pub fn notice_id<S: AsRef<str>>(event_ids: &[S]) -> String {
    let mut ids: Vec<&str> = event_ids.iter().map(AsRef::as_ref).collect();
    // `str`'s Ord is byte order, which for UTF-8 is code point order.
    ids.sort_unstable();
    let mut hasher = Sha256::new();
    for id in ids {
        hasher.update(id.as_bytes());
        hasher.update(b"\n");
    }
    let mut hex = String::with_capacity(64);
    for b in hasher.finalize() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

impl Notice {
    /// Builds the notice for distinct events in arrival order (at least one).
    ///
    /// `assigned_by` and `source` are the latest event's; the assignee's name and
    /// openid are the latest ones any event carried; the first/last times are the
    /// earliest and latest `occurred_at`, written in the event's own offset.
    pub fn from_events(events: &[&AssignmentEvent]) -> Notice {
        let last = events.last().expect("a notice covers at least one event");
        let mut assignee = last.assignee.clone();
        for e in events.iter().rev() {
            if assignee.name.is_none() {
                assignee.name.clone_from(&e.assignee.name);
            }
            if assignee.openid.is_none() {
                assignee.openid.clone_from(&e.assignee.openid);
            }
        }
        let first_at = events
            .iter()
            .min_by_key(|e| e.occurred_at)
            .expect("non-empty");
        let last_at = events
            .iter()
            .max_by_key(|e| e.occurred_at)
            .expect("non-empty");
        let event_ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
        Notice {
            notice_id: notice_id(&event_ids),
            assignee,
            customer_count: events.len(),
            customers: events
                .iter()
                .take(LISTED_CUSTOMERS)
                .map(|e| e.customer.clone())
                .collect(),
            assigned_by: last.assigned_by.clone(),
            source: last.source,
            first_assigned_at: first_at.occurred_at.to_rfc3339(),
            last_assigned_at: last_at.occurred_at.to_rfc3339(),
            summary: events.len() > 1,
            event_ids,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse;

    fn event(id: &str, customer: &str, at: &str) -> AssignmentEvent {
        parse(
            serde_json::json!({
                "event_id": id, "event_type": "customer.assigned", "occurred_at": at,
                "source": "batch", "assignee": {"user_id": "u1"},
                "customer": {"id": customer, "name": format!("客户{customer}")}
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn notice_id_is_order_independent_and_matches_the_contract_formula() {
        let a = notice_id(&["b", "a", "é"]);
        assert_eq!(a, notice_id(&["é", "a", "b"]));
        // sha256("a\nb\né\n"), computed independently with `printf 'a\nb\né\n' | sha256sum`.
        let mut h = Sha256::new();
        h.update("a\nb\né\n".as_bytes());
        let expected: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(a, expected);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn summary_lists_ten_and_counts_all() {
        let events: Vec<AssignmentEvent> = (0..12)
            .map(|i| {
                event(
                    &format!("e{i}"),
                    &i.to_string(),
                    "2026-11-25T14:03:27+08:00",
                )
            })
            .collect();
        let refs: Vec<&AssignmentEvent> = events.iter().collect();
        let n = Notice::from_events(&refs);
        assert!(n.summary);
        assert_eq!(n.customer_count, 12);
        assert_eq!(n.customers.len(), 10);
        assert_eq!(n.customers[0].id, "0");
        assert_eq!(n.event_ids.len(), 12);
        assert_eq!(n.event_ids[11], "e11");
    }

    #[test]
    fn single_event_is_not_a_summary_and_times_keep_their_offset() {
        let e1 = event("x", "1", "2026-11-25T14:03:29+08:00");
        let e2 = event("y", "2", "2026-11-25T06:03:27Z");
        let n = Notice::from_events(&[&e1]);
        assert!(!n.summary);
        assert_eq!(n.first_assigned_at, "2026-11-25T14:03:29+08:00");
        let n = Notice::from_events(&[&e1, &e2]);
        assert_eq!(n.first_assigned_at, "2026-11-25T06:03:27+00:00");
        assert_eq!(n.last_assigned_at, "2026-11-25T14:03:29+08:00");
    }
}
