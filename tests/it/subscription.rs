//! The subscription event's way in (contract section 8.1), against the real
//! broker: the work queue is bound to `subscription.changed` only with the
//! grant ledger on (and a binding left by such a run is not removed), and
//! `publish --accept` publishes the event as the CRM would. Also: a bad
//! `NOTIFIER_LEDGER_URL` stops the program with exit code 2, naming the
//! variable and never its password. No PostgreSQL is needed: declaring the
//! topology and reading the settings never reach the ledger.

use crate::common;

use common::TestEnv;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use wechat_notifier::broker::{BrokerError, SUBSCRIPTION_ROUTING_KEY};
use wechat_notifier::event::{self, Event, SubscriptionEvent, SubscriptionStatus};
use wechat_notifier::publish;

const LEDGER_URL: &str = "postgres://notifier:ledger-pw-42@127.0.0.1:5432/postgres";

/// A test environment whose settings turn the grant ledger on.
async fn with_ledger(tag: &str) -> TestEnv {
    let mut env = TestEnv::new(tag).await;
    env.set("NOTIFIER_LEDGER_URL", LEDGER_URL);
    env.set("WECHAT_TEMPLATE_ID", "tpl-from-settings");
    env
}

/// The next `n` messages of the work queue, acked: (routing key, properties,
/// event). Read by a consumer of its own (the work queue is a single-active-
/// consumer quorum queue, which refuses `basic.get`), then closed.
async fn take(env: &TestEnv, n: usize) -> Vec<(String, BasicProperties, SubscriptionEvent)> {
    let channel = env.conn.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            env.queue().as_str().into(),
            "test-reader".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("a message in the work queue")
            .expect("the consumer is open")
            .unwrap();
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        let event = match event::parse_any(&delivery.data) {
            Ok(Event::Subscription(s)) => s,
            other => panic!("not a subscription event: {other:?}"),
        };
        out.push((
            delivery.routing_key.to_string(),
            delivery.properties.clone(),
            event,
        ));
    }
    let _ = channel.close(200, "read".into()).await;
    assert_eq!(env.ready(&env.queue()).await, 0, "exactly {n} message(s)");
    out
}

async fn take_one(env: &TestEnv) -> (String, BasicProperties, SubscriptionEvent) {
    take(env, 1).await.remove(0)
}

#[tokio::test]
async fn publish_accept_reaches_the_work_queue_as_the_crm_would() {
    let env = with_ledger("sub-accept").await;
    env.declare().await;
    let out = env.command(
        &[
            "publish",
            "--accept",
            "1024",
            "--openid",
            "oW1bX5Abc",
            "--template-id",
            "tpl-flag",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (key, props, e) = take_one(&env).await;
    assert_eq!(key, SUBSCRIPTION_ROUTING_KEY);
    assert_eq!(props.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        props.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(
        props.message_id().as_ref().map(|m| m.as_str()),
        Some(e.event_id.as_str()),
        "message_id is the event id"
    );
    assert_eq!(
        (
            e.user_id.as_str(),
            e.openid.as_deref(),
            e.template_id.as_str()
        ),
        ("1024", Some("oW1bX5Abc"), "tpl-flag")
    );
    assert_eq!(e.status, SubscriptionStatus::Accept);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&e.event_id), "{said}");
    env.cleanup().await;
}

#[tokio::test]
async fn the_template_defaults_to_the_setting_and_the_status_can_be_off() {
    let env = with_ledger("sub-off").await;
    env.declare().await;
    let out = env.command(&["publish", "--accept", "7", "--status", "off"], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (_, _, e) = take_one(&env).await;
    assert_eq!(e.template_id, "tpl-from-settings");
    assert_eq!(e.status, SubscriptionStatus::Off);
    assert_eq!(e.openid, None);
    // Without a template anywhere: exit 2 naming both ways to give one.
    let out = env.command(&["publish", "--accept", "7"], &[("WECHAT_TEMPLATE_ID", "")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("WECHAT_TEMPLATE_ID") && err.contains("--template-id"),
        "{err}"
    );
    // A value the service would refuse is refused here, before publishing.
    let out = env.command(&["publish", "--accept", "7", "--openid", ""], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("user.openid"));
    assert_eq!(env.ready(&env.queue()).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn only_a_ledger_binds_subscription_events_and_no_declare_unbinds_them() {
    let env = TestEnv::new("sub-bind").await;
    let accept = |n: u32| {
        publish::subscription_event(&format!("u{n}"), None, "tpl", SubscriptionStatus::Accept)
            .unwrap()
    };
    // Ledger off: the work queue takes assignments only; an accept is returned.
    env.declare().await;
    let refused = publish::publish_subscription(&env.channel, &env.exchange(), &accept(1)).await;
    assert!(
        matches!(refused, Err(BrokerError::Unroutable(_))),
        "{refused:?}"
    );
    let out = env.command(&["publish", "--accept", "1", "--template-id", "t"], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOTIFIER_LEDGER_URL"));
    // Ledger on: bound.
    let mut on = env.settings();
    on.ledger = with_ledger("unused").await.settings().ledger;
    wechat_notifier::broker::declare_topology(&env.channel, &on)
        .await
        .unwrap();
    publish::publish_subscription(&env.channel, &env.exchange(), &accept(2))
        .await
        .unwrap();
    // A later replica with the ledger off leaves the binding: such events
    // reach it (and are dead-lettered no_ledger there, to be replayed).
    env.declare().await;
    publish::publish_subscription(&env.channel, &env.exchange(), &accept(3))
        .await
        .unwrap();
    let users: Vec<String> = take(&env, 2)
        .await
        .into_iter()
        .map(|(_, _, e)| e.user_id)
        .collect();
    assert_eq!(users, vec!["u2", "u3"]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_bad_ledger_url_exits_2_naming_it_and_never_its_password() {
    let env = TestEnv::new("sub-url").await;
    for bad in [
        "postgres://notifier:ledger-pw-42@127.0.0.1:54x32/postgres",
        "postgres://notifier:ledger-pw-42@127.0.0.1:99999/postgres",
        "mysql://notifier:ledger-pw-42@127.0.0.1:3306/crm",
    ] {
        for cmd in ["run", "check"] {
            let out = env.command(
                &[cmd],
                &[
                    ("NOTIFIER_LEDGER_URL", bad),
                    ("WECHAT_TEMPLATE_ID", "t"),
                    ("RUST_LOG", "debug"),
                ],
            );
            assert_eq!(out.status.code(), Some(2), "{cmd} {bad}: {out:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(
                stderr.starts_with("wechat-notifier: NOTIFIER_LEDGER_URL: "),
                "{stderr}"
            );
            assert!(
                !stderr.contains("ledger-pw-42") && !stdout.contains("ledger-pw-42"),
                "{stderr}{stdout}"
            );
        }
    }
}

#[test]
fn the_ledger_commands_say_when_no_ledger_is_configured() {
    for args in [
        &["ledger", "held"][..],
        &["ledger", "held", "--limit", "5", "--json"][..],
        &["ledger", "show", "1024", "--json", "--names"][..],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wechat-notifier"))
            .args(args)
            .env_clear()
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "wechat-notifier: the ledger is not configured (NOTIFIER_LEDGER_URL)\n"
        );
    }
    // A bad ledger setting is still exit 2 naming it; no WeChat setting is needed.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wechat-notifier"))
        .args(["ledger", "held"])
        .env_clear()
        .env("NOTIFIER_LEDGER_URL", LEDGER_URL)
        .env("NOTIFIER_LEDGER_POOL", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOTIFIER_LEDGER_POOL"));
}
