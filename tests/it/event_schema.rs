//! `docs/event.schema.json` against the parser, both ways, over samples at
//! every limit: every sample the schema accepts parses, and every sample the
//! parser rejects the schema rejects too. The two rules JSON Schema cannot
//! state (the body's 64 KiB, integers written with a fraction) are checked
//! to be exactly the known gaps the schema's description names.

use serde_json::{json, Value};
use wechat_notifier::event;

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/event.schema.json"
    ))
    .expect("docs/event.schema.json");
    let schema: Value = serde_json::from_str(&text).expect("the schema is JSON");
    assert_eq!(
        schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
        "JSON Schema 2020-12"
    );
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("a valid schema")
}

fn valid() -> Value {
    json!({
        "event_id": "0b9f3c2e-5d1a-4a8e-9a55-2f4f3f0d9e11",
        "event_type": "customer.assigned",
        "occurred_at": "2026-11-25T14:03:27+08:00",
        "source": "web",
        "assignee": { "user_id": "1024", "name": "张三", "openid": "oW1bX5Abc" },
        "customer": { "id": "88231", "name": "上海某某贸易有限公司" },
        "assigned_by": { "user_id": "7", "name": "李经理" },
        "batch": { "id": "b-20261125-0001", "size": 50 }
    })
}

/// `valid()` with the value at `path` (a/b) set, or removed when `None`.
fn with(path: &str, value: Option<Value>) -> String {
    let mut v = valid();
    let mut parts: Vec<&str> = path.split('/').collect();
    let last = parts.pop().unwrap();
    let mut node = &mut v;
    for p in parts {
        node = &mut node[p];
    }
    match value {
        Some(x) => node[last] = x,
        None => {
            node.as_object_mut().unwrap().remove(last);
        }
    }
    v.to_string()
}

/// Samples as JSON text (some numbers cannot go through a `Value`).
fn samples() -> Vec<(String, String)> {
    let s = |n: usize, c: &str| Value::from(c.repeat(n));
    let mut out: Vec<(String, String)> = vec![("valid".into(), valid().to_string())];
    let cases: Vec<(&str, &str, Option<Value>)> = vec![
        ("event_id", "event_id", None),
        ("event_id", "event_id", Some(json!(""))),
        ("event_id", "event_id", Some(s(128, "é"))),
        ("event_id", "event_id", Some(s(129, "é"))),
        ("event_id", "event_id", Some(json!(12))),
        ("event_id", "event_id", Some(Value::Null)),
        ("event_type", "event_type", Some(json!("customer.deleted"))),
        ("event_type", "event_type", None),
        (
            "occurred_at",
            "occurred_at",
            Some(json!("2026-11-25T14:03:27Z")),
        ),
        (
            "occurred_at",
            "occurred_at",
            Some(json!("2026-11-25T14:03:27.123-05:30")),
        ),
        (
            "occurred_at",
            "occurred_at",
            Some(json!("2026-11-25T14:03:27")),
        ),
        (
            "occurred_at",
            "occurred_at",
            Some(json!("2026-02-30T14:03:27+08:00")),
        ),
        ("occurred_at", "occurred_at", Some(json!("yesterday"))),
        ("occurred_at", "occurred_at", Some(json!(1764050607))),
        ("source", "source", Some(json!("public_pool"))),
        ("source", "source", Some(json!("miniprogram"))),
        ("source", "source", Some(json!("email"))),
        ("source", "source", None),
        ("assignee", "assignee", None),
        ("assignee", "assignee", Some(Value::Null)),
        ("assignee", "assignee", Some(json!("1024"))),
        ("user_id", "assignee/user_id", Some(json!(0))),
        ("user_id", "assignee/user_id", Some(json!(u64::MAX))),
        ("user_id", "assignee/user_id", Some(json!(-1))),
        ("user_id", "assignee/user_id", Some(json!(1.5))),
        ("user_id", "assignee/user_id", Some(s(64, "号"))),
        ("user_id", "assignee/user_id", Some(s(65, "号"))),
        ("user_id", "assignee/user_id", Some(json!(""))),
        ("user_id", "assignee/user_id", Some(Value::Null)),
        ("user_id", "assignee/user_id", Some(json!(true))),
        ("name", "assignee/name", Some(Value::Null)),
        ("name", "assignee/name", Some(json!(5))),
        ("openid", "assignee/openid", None),
        ("openid", "assignee/openid", Some(json!(["o"]))),
        ("customer", "customer", None),
        ("customer", "customer", Some(json!("x"))),
        ("customer.id", "customer/id", Some(json!(88231))),
        ("customer.id", "customer/id", Some(json!(""))),
        ("customer.id", "customer/id", None),
        ("customer.name", "customer/name", Some(s(200, "公"))),
        ("customer.name", "customer/name", Some(s(201, "公"))),
        ("customer.name", "customer/name", Some(json!(""))),
        ("customer.name", "customer/name", None),
        ("assigned_by", "assigned_by", None),
        ("assigned_by", "assigned_by", Some(Value::Null)),
        ("assigned_by", "assigned_by", Some(json!({"name": "a"}))),
        ("assigned_by", "assigned_by", Some(json!({"user_id": 7}))),
        ("assigned_by", "assigned_by", Some(json!("7"))),
        ("batch", "batch", None),
        ("batch", "batch", Some(Value::Null)),
        ("batch", "batch", Some(json!({"id": "b"}))),
        ("batch.id", "batch/id", Some(s(128, "批"))),
        ("batch.id", "batch/id", Some(s(129, "批"))),
        ("batch.id", "batch/id", Some(json!(""))),
        ("batch.size", "batch/size", Some(json!(1))),
        ("batch.size", "batch/size", Some(json!(100_000))),
        ("batch.size", "batch/size", Some(json!(0))),
        ("batch.size", "batch/size", Some(json!(100_001))),
        ("batch.size", "batch/size", Some(json!(2.5))),
        ("batch.size", "batch/size", Some(json!("50"))),
        (
            "unknown field",
            "something_new",
            Some(json!({"any": [1, 2]})),
        ),
    ];
    for (label, path, value) in cases {
        out.push((format!("{label}: {path} = {value:?}"), with(path, value)));
    }
    out.push(("not an object".into(), "[1, 2]".into()));
    out.push(("a string".into(), "\"customer.assigned\"".into()));
    // Beyond 64 bits: serde_json reads it as a float; the parser refuses it.
    out.push((
        "user_id above u64".into(),
        with("assignee/user_id", Some(json!(0)))
            .replace("\"user_id\":0", "\"user_id\":184467440737095516150"),
    ));
    out
}

#[test]
fn every_schema_valid_sample_parses_and_every_rejected_one_is_schema_invalid() {
    let schema = schema();
    let mut both_ways = (0, 0);
    for (label, text) in samples() {
        let instance: Value = serde_json::from_str(&text).expect(&label);
        let schema_ok = schema.is_valid(&instance);
        let parsed = event::parse(text.as_bytes());
        if schema_ok {
            assert!(
                parsed.is_ok(),
                "{label}: schema-valid but the parser says {parsed:?}"
            );
            both_ways.0 += 1;
        }
        if let Err(e) = &parsed {
            assert!(
                !schema_ok,
                "{label}: the parser refuses ({e}) but the schema accepts"
            );
            both_ways.1 += 1;
        }
    }
    // Both sides were exercised, not just one.
    assert!(both_ways.0 >= 20 && both_ways.1 >= 30, "{both_ways:?}");
}

#[test]
fn the_rules_json_schema_cannot_state_are_the_documented_gaps() {
    let schema = schema();
    // 1. Integers written with a fraction: JSON Schema calls 50.0 an integer.
    let text = valid().to_string().replace("\"size\":50", "\"size\":50.0");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(schema.is_valid(&v));
    assert!(event::parse(text.as_bytes()).is_err());
    // 2. The 64 KiB body limit is on the bytes, not on any field.
    let mut big = valid();
    big["padding"] = Value::from("x".repeat(event::MAX_BODY_BYTES));
    assert!(schema.is_valid(&big));
    assert!(event::parse(big.to_string().as_bytes()).is_err());
    // And the schema says so, for the CRM team reading it.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/event.schema.json"
    ))
    .unwrap();
    assert!(text.contains("65,536 bytes") && text.contains("1.0"));
}
