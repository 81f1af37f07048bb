//! The `subscription.changed` event (contract section 8.1): one answer of the
//! mini program's `wx.requestSubscribeMessage` dialog, as the CRM publishes it.
//! Pure, no I/O, and held to the same rules as the assignment event (the
//! shared helpers of `event.rs`, the same wording of every rejection).
//!
//! There is no borrowed fast path here: a user answers the dialog a few times
//! a week, so these events are rare next to assignments, and the reference
//! walk over a `serde_json::Value` is fast enough.

use chrono::{DateTime, FixedOffset};
use serde_json::{json, Map, Value};

use super::{
    field_error, get, id_field, object, string_field, timestamp, InvalidEvent, EVENT_ID_MAX_CHARS,
};

/// The `event_type` of a subscription event.
pub const EVENT_TYPE: &str = "subscription.changed";
/// Longest `user.openid` and `template_id`, in characters.
const OPENID_MAX_CHARS: usize = 128;
const TEMPLATE_ID_MAX_CHARS: usize = 128;

/// The user's answer, as the ledger counts it (contract section 8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscriptionStatus {
    /// The user tapped "allow": one more credit.
    Accept,
    /// The user tapped "cancel": no change.
    Reject,
    /// The user switched this template (or every subscription) off in the
    /// settings: no credit is left.
    Off,
}

impl SubscriptionStatus {
    /// The wire word.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Accept => "accept",
            SubscriptionStatus::Reject => "reject",
            SubscriptionStatus::Off => "off",
        }
    }

    /// The status by its wire word.
    pub fn named(word: &str) -> Option<SubscriptionStatus> {
        match word {
            "accept" => Some(SubscriptionStatus::Accept),
            "reject" => Some(SubscriptionStatus::Reject),
            "off" => Some(SubscriptionStatus::Off),
            _ => None,
        }
    }
}

/// One `subscription.changed` event that passed every rule of section 8.1.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionEvent {
    /// The idempotency key: a redelivered event counts once.
    pub event_id: String,
    pub occurred_at: DateTime<FixedOffset>,
    /// `user.user_id`, as `assignee.user_id` (a string, or an integer taken as
    /// its decimal string): the key that joins it to the assignment events.
    pub user_id: String,
    /// `user.openid`: the ledger remembers it as this user's openid.
    pub openid: Option<String>,
    pub template_id: String,
    pub status: SubscriptionStatus,
}

impl SubscriptionEvent {
    /// The event as the CRM publishes it (contract section 8.1), e.g. for
    /// `publish --accept`; `parse_any` reads it back to the same event.
    pub fn to_json(&self) -> Value {
        let mut user = json!({ "user_id": self.user_id });
        if let Some(openid) = &self.openid {
            user["openid"] = json!(openid);
        }
        json!({
            "event_id": self.event_id,
            "event_type": EVENT_TYPE,
            "occurred_at": self.occurred_at.to_rfc3339(),
            "user": user,
            "template_id": self.template_id,
            "status": self.status.as_str(),
        })
    }
}

/// Every rule of section 8.1 over the body's top-level object, in the order
/// of the contract's table, stopping at the first one broken.
pub(super) fn from_object(obj: &Map<String, Value>) -> Result<SubscriptionEvent, InvalidEvent> {
    let event_id = string_field(obj, "event_id", "event_id", EVENT_ID_MAX_CHARS)?;
    match get(obj, "event_type") {
        Some(Value::String(t)) if t == EVENT_TYPE => {}
        _ => {
            return Err(field_error(
                "event_type",
                "exactly \"subscription.changed\"",
            ))
        }
    }
    let occurred_at = match get(obj, "occurred_at") {
        Some(Value::String(s)) => timestamp(s),
        _ => None,
    }
    .ok_or_else(|| field_error("occurred_at", "an RFC 3339 timestamp with offset"))?;
    let user = object(obj, "user", true)?.expect("required");
    let user_id = id_field(user, "user_id", "user.user_id")?;
    let openid = match get(user, "openid") {
        None => None,
        Some(Value::String(s)) if super::has_chars(s, OPENID_MAX_CHARS) => Some(s.clone()),
        Some(_) => {
            return Err(field_error(
                "user.openid",
                "a string of 1..128 characters or null",
            ))
        }
    };
    let template_id = string_field(obj, "template_id", "template_id", TEMPLATE_ID_MAX_CHARS)?;
    let status = get(obj, "status")
        .and_then(Value::as_str)
        .and_then(SubscriptionStatus::named)
        .ok_or_else(|| field_error("status", "one of accept, reject, off"))?;
    Ok(SubscriptionEvent {
        event_id,
        occurred_at,
        user_id,
        openid,
        template_id,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{parse, parse_any, Event, InvalidKind};
    use super::*;

    fn valid() -> Value {
        json!({
            "event_id": "3c1d9a70-2b0e-4f57-8f8e-1f0a4c2d7b10",
            "event_type": "subscription.changed",
            "occurred_at": "2026-11-25T14:05:02+08:00",
            "user": { "user_id": "1024", "openid": "oW1bX5Abc" },
            "template_id": "Xb1-tpl",
            "status": "accept",
            "something_new": {"any": 1}
        })
    }

    fn subscription(v: &Value) -> Result<SubscriptionEvent, InvalidEvent> {
        match parse_any(v.to_string().as_bytes())? {
            Event::Subscription(s) => Ok(s),
            Event::Assigned(a) => panic!("an assignment from {v}: {a:?}"),
        }
    }

    #[test]
    fn the_contract_s_example_parses() {
        let e = subscription(&valid()).unwrap();
        assert_eq!(e.event_id, "3c1d9a70-2b0e-4f57-8f8e-1f0a4c2d7b10");
        assert_eq!(e.user_id, "1024");
        assert_eq!(e.openid.as_deref(), Some("oW1bX5Abc"));
        assert_eq!(e.template_id, "Xb1-tpl");
        assert_eq!(e.status, SubscriptionStatus::Accept);
        assert_eq!(e.occurred_at.offset().local_minus_utc(), 8 * 3600);
        // What `publish --accept` writes reads back as the same event.
        assert_eq!(subscription(&e.to_json()).unwrap(), e);
    }

    #[test]
    fn each_status_and_the_optional_openid() {
        for (word, status) in [
            ("accept", SubscriptionStatus::Accept),
            ("reject", SubscriptionStatus::Reject),
            ("off", SubscriptionStatus::Off),
        ] {
            let mut v = valid();
            v["status"] = json!(word);
            assert_eq!(subscription(&v).unwrap().status, status);
            assert_eq!(status.as_str(), word);
        }
        let mut v = valid();
        v["user"]["openid"] = Value::Null;
        v["user"]["user_id"] = json!(1024);
        let e = subscription(&v).unwrap();
        assert_eq!((e.openid, e.user_id.as_str()), (None, "1024"));
        v["user"].as_object_mut().unwrap().remove("openid");
        assert_eq!(subscription(&v).unwrap().openid, None);
        v["user"]["openid"] = json!("o".repeat(128));
        assert!(subscription(&v).is_ok());
    }

    #[test]
    fn every_broken_rule_names_its_field() {
        type Mutation = Box<dyn Fn(&mut Value)>;
        let remove = |key: &'static str| -> Mutation {
            Box::new(move |v: &mut Value| {
                v.as_object_mut().unwrap().remove(key);
            })
        };
        let cases: Vec<(&str, Mutation)> = vec![
            ("event_id", remove("event_id")),
            ("event_id", Box::new(|v| v["event_id"] = json!(""))),
            (
                "event_id",
                Box::new(|v| v["event_id"] = json!("x".repeat(129))),
            ),
            (
                "occurred_at",
                Box::new(|v| v["occurred_at"] = json!("2026-11-25T14:05:02")),
            ),
            ("occurred_at", remove("occurred_at")),
            ("user", remove("user")),
            ("user", Box::new(|v| v["user"] = json!("1024"))),
            (
                "user.user_id",
                Box::new(|v| v["user"] = json!({"openid": "o"})),
            ),
            (
                "user.user_id",
                Box::new(|v| v["user"]["user_id"] = json!(-1)),
            ),
            (
                "user.user_id",
                Box::new(|v| v["user"]["user_id"] = json!("x".repeat(65))),
            ),
            ("user.openid", Box::new(|v| v["user"]["openid"] = json!(""))),
            (
                "user.openid",
                Box::new(|v| v["user"]["openid"] = json!("o".repeat(129))),
            ),
            ("user.openid", Box::new(|v| v["user"]["openid"] = json!(7))),
            ("template_id", remove("template_id")),
            ("template_id", Box::new(|v| v["template_id"] = json!(""))),
            (
                "template_id",
                Box::new(|v| v["template_id"] = json!("t".repeat(129))),
            ),
            ("template_id", Box::new(|v| v["template_id"] = json!(5))),
            ("status", remove("status")),
            ("status", Box::new(|v| v["status"] = json!("ACCEPT"))),
            ("status", Box::new(|v| v["status"] = json!("maybe"))),
        ];
        for (field, mutate) in cases {
            let mut v = valid();
            mutate(&mut v);
            let err = parse_any(v.to_string().as_bytes()).unwrap_err();
            assert_eq!(err.kind, InvalidKind::Field, "{field}");
            assert!(
                err.detail
                    .starts_with(&format!("field `{field}`: expected")),
                "{field}: {}",
                err.detail
            );
        }
    }

    #[test]
    fn parse_any_takes_assignments_as_parse_does() {
        let body = br#"{"event_id":"e-1","event_type":"customer.assigned","occurred_at":"2026-11-25T14:03:27+08:00","source":"web","assignee":{"user_id":"1024"},"customer":{"id":"1","name":"c"}}"#;
        assert_eq!(parse_any(body), parse(body).map(Event::Assigned));
        // A broken assignment keeps its sentence.
        let broken = String::from_utf8_lossy(body).replace(r#""web""#, r#""email""#);
        assert_eq!(
            parse_any(broken.as_bytes()),
            parse(broken.as_bytes()).map(Event::Assigned)
        );
        // The bytes checks come first, as in `parse`.
        let big = vec![b' '; super::super::MAX_BODY_BYTES + 1];
        assert_eq!(parse_any(&big).unwrap_err().kind, InvalidKind::TooLarge);
        assert_eq!(parse_any(b"[1]").unwrap_err().kind, InvalidKind::NotJson);
    }

    #[test]
    fn an_unknown_event_type_names_both_accepted_types() {
        let mut v = valid();
        v["event_type"] = json!("customer.deleted");
        let err = parse_any(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(
            err.detail,
            "field `event_type`: expected exactly \"customer.assigned\" or \"subscription.changed\""
        );
        // `parse`, which takes assignments only, refuses a subscription event.
        let err = parse(valid().to_string().as_bytes()).unwrap_err();
        assert_eq!(
            err.detail,
            "field `event_type`: expected exactly \"customer.assigned\""
        );
    }
}
