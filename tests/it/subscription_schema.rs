//! `docs/subscription.schema.json` against the parser (`event::parse_any`),
//! both ways, over samples at every limit, as tests/event_schema.rs does for
//! the assignment event: every sample the schema accepts parses as a
//! subscription event, and every sample the parser rejects the schema
//! rejects too. The rules JSON Schema cannot state are the documented gaps.

use serde_json::{json, Value};
use wechat_notifier::event::{self, Event};

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/subscription.schema.json"
    ))
    .expect("docs/subscription.schema.json");
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
        "event_id": "3c1d9a70-2b0e-4f57-8f8e-1f0a4c2d7b10",
        "event_type": "subscription.changed",
        "occurred_at": "2026-11-25T14:05:02+08:00",
        "user": { "user_id": "1024", "openid": "oW1bX5Abc" },
        "template_id": "Xb1-template",
        "status": "accept"
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

fn samples() -> Vec<(String, String)> {
    let s = |n: usize, c: &str| Value::from(c.repeat(n));
    let mut out: Vec<(String, String)> = vec![("valid".into(), valid().to_string())];
    let cases: Vec<(&str, Option<Value>)> = vec![
        ("event_id", None),
        ("event_id", Some(json!(""))),
        ("event_id", Some(s(128, "é"))),
        ("event_id", Some(s(129, "é"))),
        ("event_id", Some(json!(12))),
        ("event_id", Some(Value::Null)),
        ("event_type", None),
        ("event_type", Some(json!("subscription.updated"))),
        ("occurred_at", Some(json!("2026-11-25T14:05:02Z"))),
        ("occurred_at", Some(json!("2026-11-25T14:05:02.5-05:30"))),
        ("occurred_at", Some(json!("2026-11-25T14:05:02"))),
        ("occurred_at", Some(json!("2026-02-30T14:05:02+08:00"))),
        ("occurred_at", Some(json!(1764050702))),
        ("occurred_at", None),
        ("user", None),
        ("user", Some(Value::Null)),
        ("user", Some(json!("1024"))),
        ("user", Some(json!({"openid": "o"}))),
        ("user/user_id", Some(json!(0))),
        ("user/user_id", Some(json!(u64::MAX))),
        ("user/user_id", Some(json!(-1))),
        ("user/user_id", Some(json!(1.5))),
        ("user/user_id", Some(s(64, "号"))),
        ("user/user_id", Some(s(65, "号"))),
        ("user/user_id", Some(json!(""))),
        ("user/user_id", Some(Value::Null)),
        ("user/openid", None),
        ("user/openid", Some(Value::Null)),
        ("user/openid", Some(json!(""))),
        ("user/openid", Some(s(128, "o"))),
        ("user/openid", Some(s(129, "o"))),
        ("user/openid", Some(json!(["o"]))),
        ("template_id", None),
        ("template_id", Some(Value::Null)),
        ("template_id", Some(json!(""))),
        ("template_id", Some(s(128, "模"))),
        ("template_id", Some(s(129, "模"))),
        ("template_id", Some(json!(7))),
        ("status", Some(json!("reject"))),
        ("status", Some(json!("off"))),
        ("status", Some(json!("Accept"))),
        ("status", Some(json!("ban"))),
        ("status", Some(Value::Null)),
        ("status", None),
        ("something_new", Some(json!({"any": [1, 2]}))),
        ("user/something_new", Some(json!(true))),
    ];
    for (path, value) in cases {
        out.push((format!("{path} = {value:?}"), with(path, value)));
    }
    out.push(("not an object".into(), "[1, 2]".into()));
    out
}

#[test]
fn every_schema_valid_sample_parses_and_every_rejected_one_is_schema_invalid() {
    let schema = schema();
    let mut both_ways = (0, 0);
    for (label, text) in samples() {
        let instance: Value = serde_json::from_str(&text).expect(&label);
        let schema_ok = schema.is_valid(&instance);
        let parsed = event::parse_any(text.as_bytes());
        if schema_ok {
            assert!(
                matches!(parsed, Ok(Event::Subscription(_))),
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
    assert!(both_ways.0 >= 15 && both_ways.1 >= 25, "{both_ways:?}");
}

#[test]
fn the_rules_json_schema_cannot_state_are_the_documented_gaps() {
    let schema = schema();
    // 1. Integers written with a fraction: JSON Schema calls 1024.0 an integer.
    let text = with("user/user_id", Some(json!(1))).replace("\"user_id\":1", "\"user_id\":1.0");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(schema.is_valid(&v), "{text}");
    assert!(event::parse_any(text.as_bytes()).is_err());
    // 2. The 64 KiB body limit is on the bytes, not on any field.
    let mut big = valid();
    big["padding"] = Value::from("x".repeat(event::MAX_BODY_BYTES));
    assert!(schema.is_valid(&big));
    assert!(event::parse_any(big.to_string().as_bytes()).is_err());
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/subscription.schema.json"
    ))
    .unwrap();
    assert!(text.contains("65,536 bytes") && text.contains("1.0"));
}
