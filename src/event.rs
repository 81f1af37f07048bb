//! Raw message bytes -> a validated `AssignmentEvent` (contract section 1), or
//! with `parse_any` also a `SubscriptionEvent` (section 8.1, in `subscription`).
//! Pure, no I/O: raw JSON stops here, and everything further in takes the
//! validated type. An `InvalidEvent` carries the one sentence that goes into the
//! dead letter's `x-notifier-detail` header, naming the field at fault.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod borrowed;
pub mod subscription;

pub use subscription::{SubscriptionEvent, SubscriptionStatus};

/// Bodies above this many bytes are invalid (64 KiB).
pub const MAX_BODY_BYTES: usize = 65_536;

/// The CRM's four assignment paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssignSource {
    Miniprogram,
    Web,
    Batch,
    PublicPool,
}

impl AssignSource {
    pub fn as_str(self) -> &'static str {
        match self {
            AssignSource::Miniprogram => "miniprogram",
            AssignSource::Web => "web",
            AssignSource::Batch => "batch",
            AssignSource::PublicPool => "public_pool",
        }
    }
    /// How the notice names the path to a salesperson.
    pub fn label_zh(self) -> &'static str {
        match self {
            AssignSource::Miniprogram => "小程序",
            AssignSource::Web => "网页",
            AssignSource::Batch => "批量分配",
            AssignSource::PublicPool => "公海",
        }
    }
}

/// A member of staff (assignee or assigner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    pub user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub openid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub id: String,
    pub size: u32,
}

/// One `customer.assigned` event that passed every rule of section 1.
#[derive(Debug, Clone, PartialEq)]
pub struct AssignmentEvent {
    pub event_id: String,
    pub occurred_at: DateTime<FixedOffset>,
    pub source: AssignSource,
    pub assignee: Person,
    pub customer: Customer,
    pub assigned_by: Option<Person>,
    pub batch: Option<Batch>,
}

/// Any event the work queue carries: an assignment, or with the grant ledger
/// a user's answer to the subscription dialog.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Assigned(AssignmentEvent),
    Subscription(SubscriptionEvent),
}

/// Why a message is not a valid event: kind for the metric label, detail for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct InvalidEvent {
    pub kind: InvalidKind,
    pub detail: String,
}

/// A small set, so it can be a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidKind {
    TooLarge,
    NotUtf8,
    NotJson,
    Field,
}

impl InvalidKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidKind::TooLarge => "too_large",
            InvalidKind::NotUtf8 => "not_utf8",
            InvalidKind::NotJson => "not_json",
            InvalidKind::Field => "field",
        }
    }
}

/// Longest `event_id`, in characters.
const EVENT_ID_MAX_CHARS: usize = 128;
/// Longest `batch.id`, in characters.
const BATCH_ID_MAX_CHARS: usize = 128;
/// Longest string `user_id` or `customer.id`, in characters.
const ID_MAX_CHARS: usize = 64;
/// Longest `customer.name`, in characters.
const CUSTOMER_NAME_MAX_CHARS: usize = 200;
/// The only `event_type` this service takes.
const EVENT_TYPE: &str = "customer.assigned";

/// Whether `s` has 1..=`max` characters: the contract counts Unicode
/// characters, not bytes. U+0000 is refused: PostgreSQL's text (the grant
/// ledger keeps ids and openids) cannot hold it, so one such event would fail
/// every ledger statement it rides in; no CRM id or name has one.
fn has_chars(s: &str, max: usize) -> bool {
    !s.contains('\0') && (1..=max).contains(&s.chars().count())
}

/// `source` by its wire name.
fn source_named(name: &str) -> Option<AssignSource> {
    match name {
        "miniprogram" => Some(AssignSource::Miniprogram),
        "web" => Some(AssignSource::Web),
        "batch" => Some(AssignSource::Batch),
        "public_pool" => Some(AssignSource::PublicPool),
        _ => None,
    }
}

/// `occurred_at`: RFC 3339, which always carries an offset (`Z` or `±hh:mm`).
fn timestamp(s: &str) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_rfc3339(s).ok()
}

/// `batch.size`: 1..=100000.
fn batch_size(n: u64) -> Option<u32> {
    u32::try_from(n).ok().filter(|s| (1..=100_000).contains(s))
}

/// Validates one message body against every rule of contract section 1.
///
/// Two paths give one answer. The fast path (`borrowed::parse`) reads the
/// body straight into borrowed fields and builds the event with no other
/// allocation than its own strings; it accepts only bodies it is sure of and
/// declines everything else. A declined body goes through `parse_value`, a
/// walk over a `serde_json::Value`, which decides it and words every
/// rejection. So every rejection sentence comes from one place, and the fast
/// path only has to be right about what it accepts.
///
/// # Errors
/// An `InvalidEvent` naming the first rule broken; such a message is never retried.
pub fn parse(body: &[u8]) -> Result<AssignmentEvent, InvalidEvent> {
    match fast_path(body) {
        Some(event) => Ok(event),
        None => parse_value(body_text(body)?),
    }
}

/// The fast path on a body within the size limit. It reads the bytes:
/// serde_json checks the UTF-8 of every string it reads and takes no other
/// non-ASCII byte, so a body it reads whole is valid UTF-8, and a valid
/// event is not checked twice.
fn fast_path(body: &[u8]) -> Option<AssignmentEvent> {
    (body.len() <= MAX_BODY_BYTES)
        .then(|| borrowed::parse(body))
        .flatten()
}

/// Validates one message body as either event the work queue carries
/// (`customer.assigned`, or `subscription.changed` of contract section 8.1).
///
/// An assignment costs what it costs in `parse`: the fast path is tried
/// first, and a body it declines is read once into a `Value`, where
/// `event_type` chooses the rules. A body that is neither gets the assignment
/// rules' first broken one; when that is `event_type`, the sentence names both
/// accepted types.
///
/// # Errors
/// An `InvalidEvent` naming the first rule broken; such a message is never retried.
pub fn parse_any(body: &[u8]) -> Result<Event, InvalidEvent> {
    if let Some(event) = fast_path(body) {
        return Ok(Event::Assigned(event));
    }
    let text = body_text(body)?;
    let obj = json_object(text)?;
    if let Some(Value::String(t)) = get(&obj, "event_type") {
        if t == subscription::EVENT_TYPE {
            return subscription::from_object(&obj).map(Event::Subscription);
        }
    }
    assignment_from(&obj).map(Event::Assigned).map_err(|e| {
        if e == event_type_error() {
            field_error(
                "event_type",
                "exactly \"customer.assigned\" or \"subscription.changed\"",
            )
        } else {
            e
        }
    })
}

/// The rejection of an assignment's `event_type`.
fn event_type_error() -> InvalidEvent {
    field_error("event_type", "exactly \"customer.assigned\"")
}

/// The body's size and encoding, checked before any JSON is read.
fn body_text(body: &[u8]) -> Result<&str, InvalidEvent> {
    if body.len() > MAX_BODY_BYTES {
        return Err(InvalidEvent {
            kind: InvalidKind::TooLarge,
            detail: format!(
                "body is {} bytes, more than the limit of {MAX_BODY_BYTES}",
                body.len()
            ),
        });
    }
    std::str::from_utf8(body).map_err(|e| InvalidEvent {
        kind: InvalidKind::NotUtf8,
        detail: format!("body is not valid UTF-8 (at byte {})", e.valid_up_to()),
    })
}

fn field_error(field: &str, expected: &str) -> InvalidEvent {
    InvalidEvent {
        kind: InvalidKind::Field,
        detail: format!("field `{field}`: expected {expected}"),
    }
}

/// Treats JSON `null` as absent, as the contract says.
fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn string_field(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
    max_chars: usize,
) -> Result<String, InvalidEvent> {
    // The message is only formatted on the way out: most calls succeed.
    let expected = || format!("a string of 1..{max_chars} characters");
    match get(obj, key) {
        Some(Value::String(s)) if has_chars(s, max_chars) => Ok(s.clone()),
        Some(_) => Err(field_error(path, &expected())),
        None => Err(field_error(
            path,
            &format!("{}, but it is missing", expected()),
        )),
    }
}

fn optional_string(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<String>, InvalidEvent> {
    match get(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(field_error(path, "a string or null")),
    }
}

/// `user_id` and `customer.id`: a string of 1..64 characters or a u64.
fn id_field(obj: &Map<String, Value>, key: &str, path: &str) -> Result<String, InvalidEvent> {
    let expected = "a string of 1..64 characters or a non-negative 64-bit integer";
    match get(obj, key) {
        Some(Value::String(s)) if has_chars(s, ID_MAX_CHARS) => Ok(s.clone()),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.to_string()),
        Some(_) => Err(field_error(path, expected)),
        None => Err(field_error(path, &format!("{expected}, but it is missing"))),
    }
}

fn object<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    required: bool,
) -> Result<Option<&'a Map<String, Value>>, InvalidEvent> {
    match get(obj, key) {
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(field_error(key, "an object")),
        None if required => Err(field_error(key, "an object, but it is missing")),
        None => Ok(None),
    }
}

fn person(
    obj: &Map<String, Value>,
    prefix: &str,
    with_openid: bool,
) -> Result<Person, InvalidEvent> {
    let user_id = id_field(obj, "user_id", &format!("{prefix}.user_id"))?;
    let name = optional_string(obj, "name", &format!("{prefix}.name"))?;
    let openid = if with_openid {
        optional_string(obj, "openid", &format!("{prefix}.openid"))?
    } else {
        None
    };
    Ok(Person {
        user_id,
        name,
        openid,
    })
}

/// The reference path: the whole body as a `serde_json::Value`, then each
/// rule in contract order, stopping at the first one broken. It defines what
/// `parse` accepts and the exact sentence of every rejection; `parse` runs it
/// only for bodies the fast path declined.
fn parse_value(text: &str) -> Result<AssignmentEvent, InvalidEvent> {
    assignment_from(&json_object(text)?)
}

/// The body as a JSON object, or why it is not one.
fn json_object(text: &str) -> Result<Map<String, Value>, InvalidEvent> {
    let value: Value = serde_json::from_str(text).map_err(|e| InvalidEvent {
        kind: InvalidKind::NotJson,
        detail: format!("body is not valid JSON: {e}"),
    })?;
    let Value::Object(obj) = value else {
        return Err(InvalidEvent {
            kind: InvalidKind::NotJson,
            detail: "body is JSON but not an object".into(),
        });
    };
    Ok(obj)
}

/// Every rule of contract section 1 over the body's top-level object.
fn assignment_from(obj: &Map<String, Value>) -> Result<AssignmentEvent, InvalidEvent> {
    let event_id = string_field(obj, "event_id", "event_id", EVENT_ID_MAX_CHARS)?;
    match get(obj, "event_type") {
        Some(Value::String(t)) if t == EVENT_TYPE => {}
        _ => return Err(event_type_error()),
    }
    let occurred_at = match get(obj, "occurred_at") {
        Some(Value::String(s)) => timestamp(s),
        _ => None,
    }
    .ok_or_else(|| field_error("occurred_at", "an RFC 3339 timestamp with offset"))?;
    let source = get(obj, "source")
        .and_then(Value::as_str)
        .and_then(source_named)
        .ok_or_else(|| field_error("source", "one of miniprogram, web, batch, public_pool"))?;
    let assignee_obj = object(obj, "assignee", true)?.expect("required");
    let assignee = person(assignee_obj, "assignee", true)?;
    let customer_obj = object(obj, "customer", true)?.expect("required");
    let customer = Customer {
        id: id_field(customer_obj, "id", "customer.id")?,
        name: string_field(
            customer_obj,
            "name",
            "customer.name",
            CUSTOMER_NAME_MAX_CHARS,
        )?,
    };
    let assigned_by = match object(obj, "assigned_by", false)? {
        Some(o) => Some(person(o, "assigned_by", false)?),
        None => None,
    };
    let batch = match object(obj, "batch", false)? {
        Some(o) => {
            let id = string_field(o, "id", "batch.id", BATCH_ID_MAX_CHARS)?;
            let size = match get(o, "size") {
                Some(Value::Number(n)) => n.as_u64().and_then(batch_size),
                _ => None,
            }
            .ok_or_else(|| field_error("batch.size", "an integer from 1 to 100000"))?;
            Some(Batch { id, size })
        }
        None => None,
    };
    Ok(AssignmentEvent {
        event_id,
        occurred_at,
        source,
        assignee,
        customer,
        assigned_by,
        batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    type Mutation = Box<dyn Fn(&mut Value)>;

    fn valid() -> Value {
        json!({
            "event_id": "e-1",
            "event_type": "customer.assigned",
            "occurred_at": "2026-11-25T14:03:27+08:00",
            "source": "web",
            "assignee": { "user_id": "1024", "name": "张三", "openid": "oW1" },
            "customer": { "id": 88231, "name": "上海某某贸易有限公司" },
            "assigned_by": { "user_id": 7, "name": "李经理" },
            "batch": { "id": "b-1", "size": 50 },
            "something_new": [1, 2, 3]
        })
    }

    fn parse_json(v: &Value) -> Result<AssignmentEvent, InvalidEvent> {
        same_answer(&v.to_string()).1
    }

    /// Runs `text` through both paths and checks `parse`'s promise: the fast
    /// path either declines or builds exactly the reference path's event, and
    /// `parse` answers exactly what the reference path answers. Returns the
    /// fast path's event (if it took the body) and that answer.
    fn same_answer(
        text: &str,
    ) -> (
        Option<AssignmentEvent>,
        Result<AssignmentEvent, InvalidEvent>,
    ) {
        let fast = borrowed::parse(text.as_bytes());
        let reference = parse_value(text);
        if let Some(event) = &fast {
            assert_eq!(Ok(event), reference.as_ref(), "fast path on {text}");
        }
        assert_eq!(parse(text.as_bytes()), reference, "parse on {text}");
        (fast, reference)
    }

    #[test]
    fn a_full_event_parses_and_unknown_fields_are_ignored() {
        let e = parse_json(&valid()).unwrap();
        assert_eq!(e.event_id, "e-1");
        assert_eq!(e.customer.id, "88231");
        assert_eq!(e.assigned_by.unwrap().user_id, "7");
        assert_eq!(
            e.batch,
            Some(Batch {
                id: "b-1".into(),
                size: 50
            })
        );
        assert_eq!(e.assignee.openid.as_deref(), Some("oW1"));
        assert_eq!(e.occurred_at.offset().local_minus_utc(), 8 * 3600);
    }

    #[test]
    fn nulls_are_the_same_as_absent() {
        let mut v = valid();
        v["assigned_by"] = Value::Null;
        v["batch"] = Value::Null;
        v["assignee"]["name"] = Value::Null;
        let e = parse_json(&v).unwrap();
        assert!(e.assigned_by.is_none() && e.batch.is_none() && e.assignee.name.is_none());
    }

    #[test]
    fn a_nul_character_is_refused_by_both_paths() {
        for (field, set) in [
            (
                "event_id",
                Box::new(|v: &mut Value| v["event_id"] = json!("e\u{0}1")) as Mutation,
            ),
            (
                "assignee.user_id",
                Box::new(|v: &mut Value| v["assignee"]["user_id"] = json!("u\u{0}")),
            ),
        ] {
            let mut v = valid();
            set(&mut v);
            let e = parse_json(&v).expect_err(field);
            assert!(e.detail.contains(field), "{field}: {}", e.detail);
        }
    }

    #[test]
    fn lengths_count_characters_not_bytes() {
        let mut v = valid();
        v["customer"]["name"] = json!("公".repeat(200));
        assert!(parse_json(&v).is_ok());
        v["customer"]["name"] = json!("公".repeat(201));
        assert!(parse_json(&v).unwrap_err().detail.contains("customer.name"));
        v["customer"]["name"] = json!("x");
        v["event_id"] = json!("é".repeat(128));
        assert!(parse_json(&v).is_ok());
    }

    #[test]
    fn every_broken_rule_names_its_field() {
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "event_id",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("event_id");
                }),
            ),
            ("event_id", Box::new(|v| v["event_id"] = json!(""))),
            (
                "event_id",
                Box::new(|v| v["event_id"] = json!("x".repeat(129))),
            ),
            (
                "event_type",
                Box::new(|v| v["event_type"] = json!("customer.deleted")),
            ),
            (
                "occurred_at",
                Box::new(|v| v["occurred_at"] = json!("2026-11-25T14:03:27")),
            ),
            (
                "occurred_at",
                Box::new(|v| v["occurred_at"] = json!("yesterday")),
            ),
            ("source", Box::new(|v| v["source"] = json!("email"))),
            (
                "assignee",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("assignee");
                }),
            ),
            (
                "assignee.user_id",
                Box::new(|v| v["assignee"]["user_id"] = json!(-1)),
            ),
            (
                "assignee.user_id",
                Box::new(|v| v["assignee"]["user_id"] = json!("x".repeat(65))),
            ),
            (
                "assignee.user_id",
                Box::new(|v| v["assignee"]["user_id"] = json!(1.5)),
            ),
            (
                "assignee.openid",
                Box::new(|v| v["assignee"]["openid"] = json!(5)),
            ),
            ("customer.id", Box::new(|v| v["customer"]["id"] = json!(""))),
            (
                "customer.name",
                Box::new(|v| v["customer"]["name"] = json!("")),
            ),
            ("customer", Box::new(|v| v["customer"] = json!("x"))),
            (
                "assigned_by.user_id",
                Box::new(|v| v["assigned_by"] = json!({"name": "a"})),
            ),
            ("batch.id", Box::new(|v| v["batch"]["id"] = json!(""))),
            ("batch.size", Box::new(|v| v["batch"]["size"] = json!(0))),
            (
                "batch.size",
                Box::new(|v| v["batch"]["size"] = json!(100_001)),
            ),
        ];
        for (field, mutate) in cases {
            let mut v = valid();
            mutate(&mut v);
            let err = parse_json(&v).unwrap_err();
            assert_eq!(err.kind, InvalidKind::Field);
            assert!(
                err.detail.contains(&format!("`{field}`")),
                "{field}: {}",
                err.detail
            );
        }
    }

    /// Reading bytes, the fast path takes no body with invalid UTF-8 anywhere
    /// (a value, a key, an unknown field's string, an overlong encoding, an
    /// encoded surrogate), and `parse` words it as not UTF-8.
    #[test]
    fn invalid_utf8_inside_strings_is_never_taken_by_the_fast_path() {
        let good = valid().to_string();
        assert!(borrowed::parse(good.as_bytes()).is_some());
        let spots = [
            ("\"name\":\"", "a customer's name"),
            ("\"event_id\":\"", "the event id"),
            ("{\"", "a key"),
        ];
        for bad in [&[0xff][..], &[0xc0, 0x80], &[0xed, 0xa0, 0x80]] {
            for (spot, what) in spots {
                let at = good.find(spot).unwrap() + spot.len();
                let mut body = good.as_bytes().to_vec();
                body.splice(at..at, bad.iter().copied());
                assert!(borrowed::parse(&body).is_none(), "{what}, {bad:?}");
                assert_eq!(
                    parse(&body).unwrap_err().kind,
                    InvalidKind::NotUtf8,
                    "{what}"
                );
            }
            let mut extra = good.clone().into_bytes();
            extra.pop(); // the closing brace
            extra.extend_from_slice(b",\"crm\":{\"note\":[\"");
            extra.extend_from_slice(bad);
            extra.extend_from_slice(b"\"]}}");
            assert!(
                borrowed::parse(&extra).is_none(),
                "an unknown field, {bad:?}"
            );
            assert_eq!(parse(&extra).unwrap_err().kind, InvalidKind::NotUtf8);
        }
    }

    #[test]
    fn bytes_that_are_not_an_event() {
        assert_eq!(parse(b"{not json").unwrap_err().kind, InvalidKind::NotJson);
        assert_eq!(parse(b"[1]").unwrap_err().kind, InvalidKind::NotJson);
        assert_eq!(
            parse(&[0x7b, 0xff, 0x7d]).unwrap_err().kind,
            InvalidKind::NotUtf8
        );
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(parse(&big).unwrap_err().kind, InvalidKind::TooLarge);
    }

    /// The table's starting point, as text: some cases need what a `Value`
    /// cannot hold (repeated keys, numbers beyond u64, escapes).
    const BODY: &str = r#"{"event_id":"e-1","event_type":"customer.assigned","occurred_at":"2026-11-25T14:03:27+08:00","source":"web","assignee":{"user_id":"1024","name":"张三","openid":"oW1"},"customer":{"id":"88231","name":"上海某某贸易有限公司"},"assigned_by":{"user_id":"7","name":"李经理"},"batch":{"id":"b-1","size":50}}"#;

    /// `BODY` with the first `from` replaced by `to`.
    fn edit(from: &str, to: &str) -> String {
        assert!(BODY.contains(from), "{from} is not in BODY");
        BODY.replacen(from, to, 1)
    }

    /// `BODY` with `extra` added as the last member(s) of the top object.
    fn with_last(extra: &str) -> String {
        format!("{},{extra}}}", &BODY[..BODY.len() - 1])
    }

    enum Expect {
        /// Valid, and taken by the fast path.
        Fast,
        /// Valid, but only the reference path takes it.
        Reference,
        /// A field error with exactly this sentence.
        Field(&'static str),
        /// Not JSON (or not an object): the sentence starts with this.
        NotJson(&'static str),
    }

    const USER_ID: &str = "field `assignee.user_id`: expected a string of 1..64 characters or a non-negative 64-bit integer";
    const CUSTOMER_ID: &str = "field `customer.id`: expected a string of 1..64 characters or a non-negative 64-bit integer";
    const BATCH_SIZE: &str = "field `batch.size`: expected an integer from 1 to 100000";
    const NOT_JSON: &str = "body is not valid JSON: ";

    fn table() -> Vec<(&'static str, String, Expect)> {
        use Expect::*;
        let id = |s: &str| format!(r#""user_id":{s}"#);
        let user_id = |to: &str| edit(r#""user_id":"1024""#, &id(to));
        let nested = |depth: usize| format!(r#""deep":{}{}"#, "[".repeat(depth), "]".repeat(depth));
        vec![
            ("the reference body", BODY.to_string(), Fast),
            ("integer user_id", user_id("1024"), Fast),
            ("u64::MAX user_id", user_id("18446744073709551615"), Fast),
            ("u64::MAX + 1 user_id", user_id("18446744073709551616"), Field(USER_ID)),
            ("negative user_id", user_id("-1"), Field(USER_ID)),
            ("minus zero user_id", user_id("-0"), Field(USER_ID)),
            ("float user_id", user_id("1.5"), Field(USER_ID)),
            ("integral float user_id", user_id("7.0"), Field(USER_ID)),
            ("exponent user_id", user_id("1e3"), Field(USER_ID)),
            ("boolean user_id", user_id("true"), Field(USER_ID)),
            (
                "null user_id",
                user_id("null"),
                Field("field `assignee.user_id`: expected a string of 1..64 characters or a non-negative 64-bit integer, but it is missing"),
            ),
            ("integer customer.id", edit(r#""id":"88231""#, r#""id":88231"#), Fast),
            ("64 multibyte characters", user_id(&format!("\"{}\"", "号".repeat(64))), Fast),
            ("65 multibyte characters", user_id(&format!("\"{}\"", "号".repeat(65))), Field(USER_ID)),
            (
                "64-character customer.id",
                edit(r#""id":"88231""#, &format!(r#""id":"{}""#, "号".repeat(64))),
                Fast,
            ),
            (
                "65-character customer.id",
                edit(r#""id":"88231""#, &format!(r#""id":"{}""#, "号".repeat(65))),
                Field(CUSTOMER_ID),
            ),
            ("empty customer.id", edit(r#""id":"88231""#, r#""id":"""#), Field(CUSTOMER_ID)),
            (
                "129-character event_id",
                edit(r#""e-1""#, &format!("\"{}\"", "é".repeat(129))),
                Field("field `event_id`: expected a string of 1..128 characters"),
            ),
            (
                "201-character customer.name",
                edit("上海某某贸易有限公司", &"公".repeat(201)),
                Field("field `customer.name`: expected a string of 1..200 characters"),
            ),
            (
                "null optional fields",
                edit(r#""name":"张三","openid":"oW1""#, r#""name":null,"openid":null"#)
                    .replace(r#""name":"李经理""#, r#""name":null"#)
                    .replace(r#""batch":{"id":"b-1","size":50}"#, r#""batch":null"#),
                Fast,
            ),
            ("null assigned_by", edit(r#"{"user_id":"7","name":"李经理"}"#, "null"), Fast),
            (
                "absent optional fields",
                edit(r#","name":"张三","openid":"oW1""#, "")
                    .replace(r#","assigned_by":{"user_id":"7","name":"李经理"}"#, "")
                    .replace(r#","batch":{"id":"b-1","size":50}"#, ""),
                Fast,
            ),
            (
                "unknown fields at every level",
                with_last(r#""something_new":{"a":[1,-2,3.5,1e300,true,null,"\u00e9\n",{}]}"#)
                    .replace(r#""oW1""#, r#""oW1","tags":["x"]"#)
                    .replace(r#""88231""#, r#""88231","level":-3"#)
                    .replace(r#""size":50"#, r#""size":50,"note":"\ud83d\ude00""#),
                Fast,
            ),
            ("unknown field nested to the limit", with_last(&nested(126)), Fast),
            (
                "unknown field nested past the limit",
                with_last(&nested(127)),
                NotJson("body is not valid JSON: recursion limit exceeded"),
            ),
            (
                "unknown field out of f64 range",
                with_last(r#""big":1e400"#),
                NotJson("body is not valid JSON: number out of range"),
            ),
            (
                "unknown field with a lone surrogate",
                with_last(r#""s":"\ud800""#),
                NotJson(NOT_JSON),
            ),
            (
                "unknown key with a lone surrogate",
                with_last(r#""\udc00":1"#),
                NotJson(NOT_JSON),
            ),
            ("duplicate key: the last wins", edit(r#"{"event_id""#, r#"{"event_id":"first","event_id""#), Fast),
            (
                "duplicate key: the last is invalid",
                with_last(r#""event_id":"""#),
                Field("field `event_id`: expected a string of 1..128 characters"),
            ),
            (
                "duplicate key: the first has another type",
                edit(r#"{"event_id""#, r#"{"event_id":true,"event_id""#),
                Reference,
            ),
            ("duplicate key: the last is null", with_last(r#""batch":null"#), Fast),
            ("duplicate key spelled with an escape", with_last(r#""event\u005fid":"x""#), Fast),
            ("escapes in values", edit("张三", r#"\u5f20\u4e09"#), Fast),
            ("batch.size 1", edit(r#""size":50"#, r#""size":1"#), Fast),
            ("batch.size 100000", edit(r#""size":50"#, r#""size":100000"#), Fast),
            ("batch.size 0", edit(r#""size":50"#, r#""size":0"#), Field(BATCH_SIZE)),
            ("batch.size 100001", edit(r#""size":50"#, r#""size":100001"#), Field(BATCH_SIZE)),
            ("batch.size 50.0", edit(r#""size":50"#, r#""size":50.0"#), Field(BATCH_SIZE)),
            ("batch.size as a string", edit(r#""size":50"#, r#""size":"50""#), Field(BATCH_SIZE)),
            ("batch without size", edit(r#","size":50"#, ""), Field(BATCH_SIZE)),
            (
                "occurred_at without offset",
                edit("+08:00", ""),
                Field("field `occurred_at`: expected an RFC 3339 timestamp with offset"),
            ),
            ("occurred_at in UTC", edit("+08:00", "Z"), Fast),
            (
                "missing event_id",
                edit(r#""event_id":"e-1","#, ""),
                Field("field `event_id`: expected a string of 1..128 characters, but it is missing"),
            ),
            (
                "missing customer.name",
                edit(r#","name":"上海某某贸易有限公司""#, ""),
                Field("field `customer.name`: expected a string of 1..200 characters, but it is missing"),
            ),
            (
                "wrong event_type",
                edit("customer.assigned", "customer.deleted"),
                Field("field `event_type`: expected exactly \"customer.assigned\""),
            ),
            (
                "unknown source",
                edit(r#""web""#, r#""email""#),
                Field("field `source`: expected one of miniprogram, web, batch, public_pool"),
            ),
            ("openid not a string", edit(r#""oW1""#, "5"), Field("field `assignee.openid`: expected a string or null")),
            ("assigned_by.openid not a string", edit(r#""name":"李经理""#, r#""name":"李经理","openid":{}"#), Reference),
            (
                "assignee as an array of its fields",
                edit(r#"{"user_id":"1024","name":"张三","openid":"oW1"}"#, r#"["1024","张三","oW1"]"#),
                Field("field `assignee`: expected an object"),
            ),
            (
                "batch as an array of its fields",
                edit(r#"{"id":"b-1","size":50}"#, r#"["b-1",50]"#),
                Field("field `batch`: expected an object"),
            ),
            (
                "the event as an array of its fields",
                r#"["e-1","customer.assigned","2026-11-25T14:03:27+08:00","web"]"#.to_string(),
                NotJson("body is JSON but not an object"),
            ),
            ("trailing characters", format!("{BODY} x"), NotJson("body is not valid JSON: trailing characters")),
            ("a truncated body", BODY[..BODY.len() - 1].to_string(), NotJson(NOT_JSON)),
        ]
    }

    #[test]
    fn the_fast_path_agrees_with_the_reference_path() {
        for (label, text, expect) in table() {
            let (fast, answer) = same_answer(&text);
            match expect {
                Expect::Fast => assert!(fast.is_some(), "{label}: fast path declined: {answer:?}"),
                Expect::Reference => {
                    assert!(fast.is_none() && answer.is_ok(), "{label}: {answer:?}")
                }
                Expect::Field(detail) => {
                    let err = answer.expect_err(label);
                    assert_eq!(
                        (err.kind, err.detail.as_str()),
                        (InvalidKind::Field, detail),
                        "{label}"
                    );
                }
                Expect::NotJson(start) => {
                    let err = answer.expect_err(label);
                    assert_eq!(err.kind, InvalidKind::NotJson, "{label}");
                    assert!(err.detail.starts_with(start), "{label}: {}", err.detail);
                }
            }
        }
    }

    #[test]
    fn the_fast_path_builds_the_values_the_contract_names() {
        let user_id = |text: String| parse(text.as_bytes()).unwrap().assignee.user_id;
        let max = edit(r#""user_id":"1024""#, r#""user_id":18446744073709551615"#);
        assert_eq!(user_id(max), "18446744073709551615");
        assert_eq!(user_id(edit(r#""user_id":"1024""#, r#""user_id":0"#)), "0");
        let e =
            parse(edit(r#"{"event_id""#, r#"{"event_id":"first","event_id""#).as_bytes()).unwrap();
        assert_eq!(e.event_id, "e-1", "a repeated key keeps its last value");
        let e = parse(with_last(r#""event\u005fid":"x""#).as_bytes()).unwrap();
        assert_eq!(e.event_id, "x");
        let e = parse(edit("张三", r#"\u5f20\u4e09"#).as_bytes()).unwrap();
        assert_eq!(e.assignee.name.as_deref(), Some("张三"));
        let e = parse(edit(r#""name":"李经理""#, r#""name":"李经理","openid":"o7""#).as_bytes())
            .unwrap();
        assert_eq!(
            e.assigned_by.unwrap().openid,
            None,
            "assigned_by has no openid"
        );
    }
}
