//! The grant ledger's test helpers: an environment with the ledger on (its
//! own PostgreSQL schema), its store, and events as the CRM publishes them.

use std::collections::BTreeMap;

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use wechat_notifier::broker::header_str;
use wechat_notifier::ledger::store::{HoldArgs, Store, ToHold};
use wechat_notifier::settings::Settings;

use super::TestEnv;

pub const TEMPLATE: &str = "tmpl-ledger-test";

pub fn ledger_url() -> String {
    std::env::var("NOTIFIER_TEST_LEDGER_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A test environment with the ledger on, in a schema of its own.
pub async fn ledger_env(tag: &str) -> TestEnv {
    let mut env = TestEnv::new(tag).await;
    env.set("NOTIFIER_LEDGER_URL", &ledger_url());
    env.set(
        "NOTIFIER_LEDGER_SCHEMA",
        &format!("t_{}_{:08x}", tag.replace('-', "_"), fastrand::u32(..)),
    );
    env.set("WECHAT_TEMPLATE_ID", TEMPLATE);
    env
}

/// The ledger's store, as the service sees it (migrated).
pub async fn store(settings: &Settings) -> Store {
    let s = Store::connect(settings.ledger.as_ref().expect("ledger on"), None).unwrap();
    s.migrate().await.unwrap();
    s
}

pub fn event(id: &str, user: &str, customer: &str) -> Value {
    json!({
        "event_id": id,
        "event_type": "customer.assigned",
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "source": "web",
        "assignee": {"user_id": user, "name": "张三"},
        "customer": {"id": customer, "name": format!("客户{customer}")},
    })
}

pub fn subscription(id: &str, user: &str, template: &str, status: &str) -> Value {
    json!({
        "event_id": id,
        "event_type": "subscription.changed",
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "user": {"user_id": user, "openid": format!("o-{user}")},
        "template_id": template,
        "status": status,
    })
}

/// Publishes a `subscription.changed` event as the CRM would (confirmed).
pub async fn publish_subscription(env: &TestEnv, body: &Value) {
    env.channel
        .basic_publish(
            env.exchange().as_str().into(),
            "subscription.changed".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(body).unwrap(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

pub fn notice_calls_for(env: &TestEnv, user: &str) -> Vec<wechat_notifier::sim::Call> {
    env.sim
        .notice_calls()
        .into_iter()
        .filter(|c| c.body["notice"]["assignee"]["user_id"] == user)
        .collect()
}

/// How many events the ledger holds for `user` (`usize::MAX` while it
/// cannot be read).
pub async fn held_count(s: &Store, user: &str) -> usize {
    s.held_of(user).await.map(|h| h.len()).unwrap_or(usize::MAX)
}

/// The test's own ledger schema.
pub fn schema(env: &TestEnv) -> String {
    env.settings().ledger.expect("ledger on").schema.clone()
}

/// A connection of the test's own to the ledger's schema.
pub async fn pg(env: &TestEnv) -> PgConnection {
    let mut c = PgConnection::connect(&ledger_url()).await.unwrap();
    sqlx::query(&format!("SET search_path TO {}", schema(env)))
        .execute(&mut c)
        .await
        .unwrap();
    c
}

/// A connection of the test's own holding `table` locked in `mode` (an
/// open transaction) until it is rolled back or dropped.
pub async fn locked(env: &TestEnv, table: &str, mode: &str) -> PgConnection {
    let mut c = pg(env).await;
    sqlx::query("BEGIN").execute(&mut c).await.unwrap();
    sqlx::query(&format!("LOCK TABLE {table} IN {mode} MODE"))
        .execute(&mut c)
        .await
        .unwrap();
    c
}

/// Whether a statement of the service that begins with `statement` (a
/// `LIKE` pattern) waits for a lock on `table` of the test's schema, or on
/// a transaction that holds rows of it.
pub async fn someone_waits_on(env: &TestEnv, table: &str, statement: &str) -> bool {
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
         WHERE NOT l.granted AND a.query LIKE '{statement}%'
           AND (l.relation = '{s}.{table}'::regclass OR l.locktype = 'transactionid')
           AND a.query LIKE '%{table}%'",
        s = schema(env)
    ))
    .fetch_one(&mut pg(env).await)
    .await
    .unwrap();
    n > 0
}

/// Per event id, the notice ids WeChat accepted it in.
pub fn delivered_in(env: &TestEnv) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in env.sim.delivered() {
        for id in n["event_ids"].as_array().into_iter().flatten() {
            out.entry(id.as_str().unwrap().to_string())
                .or_default()
                .push(n["notice_id"].as_str().unwrap().to_string());
        }
    }
    out
}

/// `e` made `ms` older than now.
pub fn aged(mut e: Value, ms: i64) -> Value {
    let at = chrono::Local::now().fixed_offset() - chrono::Duration::milliseconds(ms);
    e["occurred_at"] = json!(at.to_rfc3339());
    e
}

/// The dead letters now in the test's dead queue: (event id, reason).
pub async fn dead_ids(env: &TestEnv) -> Vec<(String, String)> {
    env.drain(&env.dead_queue())
        .await
        .into_iter()
        .map(|(body, p)| {
            let v: Value = serde_json::from_slice(&body).unwrap();
            (
                v["event_id"].as_str().unwrap().to_string(),
                header_str(&p, "x-notifier-reason").unwrap_or_default(),
            )
        })
        .collect()
}

/// Holds `e` for `user` at an exact 0, as after a `43101`.
pub async fn held_at_zero(s: &Store, user: &str, e: &Value) {
    let args = HoldArgs {
        user_id: user.into(),
        events: vec![ToHold {
            event_id: e["event_id"].as_str().unwrap().into(),
            body: serde_json::to_vec(e).unwrap(),
            traceparent: None,
            attempts: 0,
        }],
        reason: "no_credit",
        errcode: Some(43101),
        guard_version: Some(0),
        ..HoldArgs::default()
    };
    s.hold(TEMPLATE, &args).await.unwrap();
}
