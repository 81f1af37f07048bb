//! Raw message bytes -> a validated `AssignmentEvent` (contract section 1).
//! Pure, no I/O: raw JSON stops here, and everything further in takes the
//! validated type. An `InvalidEvent` carries the one sentence that goes into the
//! dead letter's `x-notifier-detail` header, naming the field at fault.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
    let expected = format!("a string of 1..{max_chars} characters");
    match get(obj, key) {
        Some(Value::String(s)) if (1..=max_chars).contains(&s.chars().count()) => Ok(s.clone()),
        Some(_) => Err(field_error(path, &expected)),
        None => Err(field_error(path, &format!("{expected}, but it is missing"))),
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
        Some(Value::String(s)) if (1..=64).contains(&s.chars().count()) => Ok(s.clone()),
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

/// Validates one message body against every rule of contract section 1.
///
/// # Errors
/// An `InvalidEvent` naming the first rule broken; such a message is never retried.
pub fn parse(body: &[u8]) -> Result<AssignmentEvent, InvalidEvent> {
    if body.len() > MAX_BODY_BYTES {
        return Err(InvalidEvent {
            kind: InvalidKind::TooLarge,
            detail: format!(
                "body is {} bytes, more than the limit of {MAX_BODY_BYTES}",
                body.len()
            ),
        });
    }
    let text = std::str::from_utf8(body).map_err(|e| InvalidEvent {
        kind: InvalidKind::NotUtf8,
        detail: format!("body is not valid UTF-8 (at byte {})", e.valid_up_to()),
    })?;
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

    let event_id = string_field(&obj, "event_id", "event_id", 128)?;
    match get(&obj, "event_type") {
        Some(Value::String(t)) if t == "customer.assigned" => {}
        _ => return Err(field_error("event_type", "exactly \"customer.assigned\"")),
    }
    let occurred_at = match get(&obj, "occurred_at") {
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s).ok(),
        _ => None,
    }
    .ok_or_else(|| field_error("occurred_at", "an RFC 3339 timestamp with offset"))?;
    let source = match get(&obj, "source").and_then(Value::as_str) {
        Some("miniprogram") => AssignSource::Miniprogram,
        Some("web") => AssignSource::Web,
        Some("batch") => AssignSource::Batch,
        Some("public_pool") => AssignSource::PublicPool,
        _ => {
            return Err(field_error(
                "source",
                "one of miniprogram, web, batch, public_pool",
            ))
        }
    };
    let assignee_obj = object(&obj, "assignee", true)?.expect("required");
    let assignee = person(assignee_obj, "assignee", true)?;
    let customer_obj = object(&obj, "customer", true)?.expect("required");
    let customer = Customer {
        id: id_field(customer_obj, "id", "customer.id")?,
        name: string_field(customer_obj, "name", "customer.name", 200)?,
    };
    let assigned_by = match object(&obj, "assigned_by", false)? {
        Some(o) => Some(person(o, "assigned_by", false)?),
        None => None,
    };
    let batch = match object(&obj, "batch", false)? {
        Some(o) => {
            let id = string_field(o, "id", "batch.id", 128)?;
            let size = match get(o, "size") {
                Some(Value::Number(n)) => n.as_u64().filter(|s| (1..=100_000).contains(s)),
                _ => None,
            }
            .ok_or_else(|| field_error("batch.size", "an integer from 1 to 100000"))?;
            Some(Batch {
                id,
                size: size as u32,
            })
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

    fn parse_value(v: &Value) -> Result<AssignmentEvent, InvalidEvent> {
        parse(&serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn a_full_event_parses_and_unknown_fields_are_ignored() {
        let e = parse_value(&valid()).unwrap();
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
        let e = parse_value(&v).unwrap();
        assert!(e.assigned_by.is_none() && e.batch.is_none() && e.assignee.name.is_none());
    }

    #[test]
    fn lengths_count_characters_not_bytes() {
        let mut v = valid();
        v["customer"]["name"] = json!("公".repeat(200));
        assert!(parse_value(&v).is_ok());
        v["customer"]["name"] = json!("公".repeat(201));
        assert!(parse_value(&v)
            .unwrap_err()
            .detail
            .contains("customer.name"));
        v["customer"]["name"] = json!("x");
        v["event_id"] = json!("é".repeat(128));
        assert!(parse_value(&v).is_ok());
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
            let err = parse_value(&v).unwrap_err();
            assert_eq!(err.kind, InvalidKind::Field);
            assert!(
                err.detail.contains(&format!("`{field}`")),
                "{field}: {}",
                err.detail
            );
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
}
