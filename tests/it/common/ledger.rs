//! The grant ledger's test helpers: an environment with the ledger on (its
//! own PostgreSQL schema), its store, and events as the CRM publishes them.

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::{json, Value};
use wechat_notifier::ledger::store::Store;
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
